"""Scaling of task-parallel meta-training from 1 to N processes on this machine: second-order MAML
meta-steps of the main job's default model and tasks (char-level transformer LM, d=64, 2 layers; T=8
tasks of 4 + 4 chunks of 48+1 characters; K=3), each process taking T/N tasks and one bucketed
all-reduce (gloo) averaging the meta-gradients (metakernels.distributed).  Reports the median time per
meta-step, meta-steps/s, the speed-up over one process with the same total number of threads, and the
all-reduce's share of the step.

    python benchmarks/distributed_scaling.py                 # 1 and 2 processes (this machine has 2 cores)
    python benchmarks/distributed_scaling.py --procs 1 2 4 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=12, help="timed meta-steps (after 2 warm-up steps)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="4 timed meta-steps")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args()


def child(args):
    import torch
    import torch.distributed as dist

    import metakernels as mk
    from metakernels import distributed
    from metakernels.data import LMTaskSampler, stdlib_domains
    from metakernels.models import TransformerLM, lm_loss
    from metakernels.tasks import select_tasks

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = TransformerLM(256, 64, 4, 2, max_len=48)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=3)
    meta_opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    sampler = LMTaskSampler(stdlib_domains())
    share = distributed.local_tasks(args.tasks)
    weight = (share.stop - share.start) / args.tasks
    steps, reduces = [], []
    for i in range(args.steps + 2):
        batch = sampler.batch(i, args.tasks)
        start = time.perf_counter()
        loss = maml(lm_loss, select_tasks(batch.support, share), select_tasks(batch.query, share))
        meta_opt.zero_grad()
        loss.backward()
        reduce_start = time.perf_counter()
        distributed.all_reduce_gradients(maml, weight)
        reduce_end = time.perf_counter()
        meta_opt.step()
        if i >= 2:
            steps.append(time.perf_counter() - start)
            reduces.append(reduce_end - reduce_start)
    if distributed.rank() == 0:
        print(json.dumps({"step": statistics.median(steps), "reduce": statistics.median(reduces)}))
    if dist.is_initialized():
        dist.destroy_process_group()


def main():
    args = parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.steps = 4
    import torch

    cores = os.cpu_count() or 1
    rows, base = [], {}
    for procs in args.procs:
        for threads in sorted({1, max(1, cores // procs)}):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                       __file__, "--child", "--steps", str(args.steps), "--tasks", str(args.tasks)]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                rows.append([str(procs), str(threads), "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:80],
                             "", "", ""])
                continue
            r = json.loads(lines[-1])
            total = procs * threads
            if procs == 1:
                base[total] = r["step"]
            speedup = f"{base[total] / r['step']:.2f}x" if total in base else "-"
            rows.append([str(procs), str(threads), f"{r['step']:.3f}", f"{1 / r['step']:.2f}", speedup,
                         f"{100 * r['reduce'] / r['step']:.1f}%"])
    print(f"torch {torch.__version__}, {cores} CPUs, T={args.tasks} tasks per meta-step, K=3, second order, "
          f"median of {args.steps} meta-steps")
    header = ["processes", "threads each", "s / meta-step", "meta-steps / s",
              "speed vs 1 process (same total threads)", "all-reduce share"]
    harness.print_table(header, rows, args.markdown, title="task-parallel MAML scaling")


if __name__ == "__main__":
    main()
