"""Task-parallel meta-training on torch.distributed: each process runs its share of a meta-batch's T
tasks, and one bucketed all-reduce turns the processes' meta-gradients into the meta-gradient of the
whole batch.

    tasks = mk.distributed.local_tasks(T)                  # this rank's slice of the T tasks
    loss = maml(loss_fn, select_tasks(support, tasks), select_tasks(query, tasks))
    loss.backward()
    mk.distributed.all_reduce_gradients(maml, weight=(tasks.stop - tasks.start) / T)
    meta_opt.step()

The meta-loss is a mean over tasks, L = 1/T sum_t L_t, so with n_r tasks on rank r and a local loss
that is the mean over its own tasks, dL = sum_r (n_r / T) dL_r: every rank scales its gradient by
``weight = n_r / T`` and the all-reduce sums.  This is exact for uneven shares too (T not divisible by
the world size), where DistributedDataParallel's plain average over ranks is not.  With equal shares
``torch.nn.parallel.DistributedDataParallel(maml)`` gives the same result and overlaps its all-reduce
with the backward; this helper runs after the backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .ops._checks import as_integer, require_number

BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's default bucket size


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_tasks(num_tasks: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of ``num_tasks`` tasks: sizes differ by at most one, the first
    ``num_tasks % world`` ranks taking one more.  Every rank needs at least one task."""
    num_tasks = _integer("num_tasks", num_tasks)
    rank_ = rank() if rank_ is None else _integer("rank_", rank_)
    world = world_size() if world is None else _integer("world", world)
    if world < 1:
        raise ValueError(f"local_tasks: argument 'world' must be >= 1, got {world}")
    if not 0 <= rank_ < world:
        raise ValueError(f"local_tasks: argument 'rank_' must be in [0, {world}) for {world} processes, got {rank_}")
    if num_tasks < world:
        raise ValueError(f"{num_tasks} tasks cannot be shared by {world} processes: each needs at least one "
                         f"(use at least {world} tasks per meta-step or fewer processes)")
    base, extra = divmod(num_tasks, world)
    start = rank_ * base + min(rank_, extra)
    return slice(start, start + base + (rank_ < extra))


def all_reduce_gradients(parameters, weight: float = 1.0) -> None:
    """Replaces every parameter's ``.grad`` by sum over ranks of ``weight * grad`` (``weight``: this rank's
    share of the meta-batch).  Gradients are flattened into buckets of at most BUCKET_BYTES per dtype and
    device, one all-reduce per bucket, all in flight at once; a sparse gradient (an unadapted embedding
    with sparse=True) is all-reduced alone and stays sparse (gloo; NCCL has no sparse all-reduce).  A
    parameter without a gradient on every rank gets one of zeros (a rank whose tasks did not use it still
    contributes).  Without an initialised process group of more than one process, only the scaling is
    applied (to the gradients there are)."""
    weight = require_number("all_reduce_gradients", "weight", weight)
    params = [p for p in (parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
              if p.requires_grad]
    if not is_distributed():
        for p in params:
            if p.grad is not None and weight != 1.0:
                p.grad.mul_(weight)
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif weight != 1.0:
            p.grad.mul_(weight)
    dense = [p for p in params if not p.grad.is_sparse]
    sparse_works = [dist.all_reduce(p.grad, async_op=True) for p in params if p.grad.is_sparse]  # in place
    pending = []
    for bucket in _buckets(dense):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
    for work in sparse_works:
        work.wait()
    for bucket, flat, work in pending:
        work.wait()
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def _integer(name: str, value) -> int:
    """``value`` as an int (Python and numpy integers, integer 0-d tensors); bools and floats refused."""
    integer = as_integer(value)
    if integer is None:
        raise TypeError(f"local_tasks: argument '{name}' must be an integer, got {type(value).__name__}")
    return integer


def all_reduce_mean(value: torch.Tensor, weight: float) -> torch.Tensor:
    """sum over ranks of ``weight * value`` (a detached copy): the meta-batch mean of a per-rank mean."""
    value = value.detach() * weight
    if is_distributed():
        dist.all_reduce(value)
    return value


def _buckets(params):
    groups: dict = {}
    for p in params:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        bucket, size = [], 0
        for p in group:
            nbytes = p.grad.numel() * p.grad.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
            bucket.append(p)
            size += nbytes
        if bucket:
            yield bucket
