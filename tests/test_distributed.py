"""Task-parallel meta-training: two gloo processes on 127.0.0.1, launched with torchrun inside the test,
give the single-process meta-gradient over the union of their tasks (float64, 1e-12), for MAML,
Meta-SGD, the learned optimizer, uneven shares, and MAML under DistributedDataParallel (also with
task_chunk, whose meta-gradient is taken in the forward and handed over in the backward); the main job
runs under torchrun, and its checkpoints resume on another number of processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from metakernels import distributed
from metakernels.training import TrainConfig, run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_cases import meta_gradients, setup  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def torchrun(*args, cwd, nproc=2):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_local_tasks_share_the_batch():
    for T in (2, 3, 7, 16):
        for world in range(1, T + 1):
            shares = [distributed.local_tasks(T, r, world) for r in range(world)]
            assert [s.start for s in shares] == [0] + [s.stop for s in shares[:-1]] and shares[-1].stop == T
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="3 tasks cannot be shared by 4 processes"):
        distributed.local_tasks(3, 0, 4)
    assert distributed.local_tasks(torch.tensor(5), np.int64(1), 2) == slice(3, 5)


@pytest.mark.parametrize("args, error, match", [
    ((5, 4, 4), ValueError, r"'rank_' must be in \[0, 4\) for 4 processes, got 4"),
    ((5, -1, 4), ValueError, r"'rank_' must be in \[0, 4\) for 4 processes, got -1"),
    ((5, 0, 0), ValueError, "'world' must be >= 1, got 0"),
    ((5.0, 0, 2), TypeError, "'num_tasks' must be an integer, got float"),
    ((True, 0, 1), TypeError, "'num_tasks' must be an integer, got bool"),
    ((5, 0.0, 2), TypeError, "'rank_' must be an integer, got float"),
    ((5, 0, "2"), TypeError, "'world' must be an integer, got str"),
])
def test_local_tasks_refuses_a_rank_or_sizes_that_do_not_fit(args, error, match):
    with pytest.raises(error, match=match):
        distributed.local_tasks(*args)


@pytest.mark.parametrize("weight, error", [(float("nan"), ValueError), (float("inf"), ValueError), ("0.5", TypeError)])
def test_all_reduce_refuses_a_weight_that_is_not_a_finite_number(weight, error):
    a = torch.nn.Parameter(torch.ones(3))
    a.grad = torch.full((3,), 4.0)
    with pytest.raises(error, match="argument 'weight'"):
        distributed.all_reduce_gradients([a], weight=weight)
    assert torch.equal(a.grad, torch.full((3,), 4.0))


def test_single_process_all_reduce_only_scales():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    a.grad = torch.full((3,), 4.0)
    distributed.all_reduce_gradients([a, b], weight=0.25)
    assert torch.equal(a.grad, torch.ones(3)) and b.grad is None


@pytest.mark.parametrize("algo, T", [("maml", 4), ("maml", 3), ("maml-sparse", 3), ("metasgd", 4), ("lopt", 3),
                                     ("ddp", 4), ("ddp-chunked", 4)])
def test_two_processes_give_the_single_process_meta_gradient(tmp_path, algo, T):
    out = tmp_path / "grads.pt"
    done = torchrun(os.path.join(HERE, "distributed_worker.py"), algo, str(T), str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    together = torch.load(out)
    module, support, query = setup(algo, T)
    alone = [p.grad for p in meta_gradients(algo, module, support, query)["params"]]
    assert len(together) == len(alone)
    for g2, g1 in zip(together, alone):
        assert g2.dtype == torch.float64 and g2.is_sparse == g1.is_sparse == (algo == "maml-sparse" and g1 is alone[0])
        g2, g1 = g2.to_dense(), g1.to_dense()
        assert torch.allclose(g2, g1, rtol=1e-12, atol=1e-12 * g1.abs().max().item())


TINY = ["--steps", "4", "--tasks-per-step", "4", "--inner-steps", "1", "--d-model", "16", "--n-heads", "2",
        "--n-layers", "1", "--seq-len", "12", "--n-support", "2", "--n-query", "2", "--eval-tasks", "4",
        "--val-tasks", "2", "--val-every", "2", "--checkpoint-every", "2", "--no-progress", "--threads", "1"]


def config_of(text_folder):
    return TrainConfig(steps=4, tasks_per_step=4, inner_steps=1, d_model=16, n_heads=2, n_layers=1, seq_len=12,
                       n_support=2, n_query=2, eval_tasks=4, val_tasks=2, val_every=2, checkpoint_every=2,
                       data=text_folder)


def test_torchrun_main_job_matches_one_process_and_resumes_across_world_sizes(tmp_path, text_folder):
    alone = run(config_of(text_folder), progress=False, log=lambda *a: None)

    done = torchrun("-m", "metakernels", "train", *TINY, "--data", text_folder, "--out", str(tmp_path / "two"),
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("loss before") == 1                      # only rank 0 reports
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for name, phase in alone.metrics["phases"].items():
        assert two["phases"][name]["loss"] == pytest.approx(phase["loss"], rel=1e-4)

    def interrupt(phase, step):
        if (phase, step) == ("maml", 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):                            # one process, stopped after step 2
        run(config_of(text_folder), tmp_path / "mixed", progress=False, on_step=interrupt, log=lambda *a: None)
    done = torchrun("-m", "metakernels", "train", *TINY, "--data", text_folder, "--out", str(tmp_path / "mixed"),
                    "--resume", cwd=tmp_path)                         # resumed on two
    assert done.returncode == 0, done.stderr[-3000:]
    mixed = json.loads((tmp_path / "mixed" / "metrics.json").read_text())
    assert mixed["phases"]["maml"]["loss"][:2] == alone.metrics["phases"]["maml"]["loss"][:2]
    assert mixed["phases"]["maml"]["loss"] == pytest.approx(alone.metrics["phases"]["maml"]["loss"], rel=1e-4)


def test_torchrun_refuses_fewer_tasks_than_processes(tmp_path, text_folder):
    done = torchrun("-m", "metakernels", "train", *TINY, "--tasks-per-step", "1", "--data", text_folder,
                    "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode != 0 and "1 tasks cannot be shared by 2 processes" in done.stderr
