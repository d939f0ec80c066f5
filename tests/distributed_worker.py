"""Run by tests/test_distributed.py under torchrun: one rank's share of a meta-batch, its meta-gradient
all-reduced, saved by rank 0.  Usage: distributed_worker.py ALGO T OUT ('ddp' and 'ddp-chunked' as ALGO
wrap MAML in DistributedDataParallel)."""
import sys

import torch
import torch.distributed as dist

import metakernels as mk
from metakernels import distributed
from metakernels.tasks import select_tasks

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from distributed_cases import meta_gradients, setup  # noqa: E402


def main():
    algo, T, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    module, support, query = setup(algo, T)
    share = distributed.local_tasks(T)
    local = (select_tasks(support, share), select_tasks(query, share))
    if algo.startswith("ddp"):
        wrapped = torch.nn.parallel.DistributedDataParallel(module)
        grads = meta_gradients(algo, module, *local, forward=wrapped)
        del wrapped  # its reducer holds the process group, which must die in destroy_process_group, not at exit
    else:
        grads = meta_gradients(algo, module, *local)
        distributed.all_reduce_gradients(grads["params"], weight=(share.stop - share.start) / T)
    if dist.get_rank() == 0:
        torch.save([p.grad for p in grads["params"]], out)
    dist.barrier()  # a rank tearing gloo down while the other is still connected sometimes aborts it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
