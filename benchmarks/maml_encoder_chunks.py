"""MAML on a head over features an encoder computes before the call (``x = encoder(tokens)``, the
encoder meta-trained too), in the fast mode and the chunked modes, side by side in one run.

The chunked modes (task_chunk, memory="low") take each chunk's meta-gradient inside the forward.  Where
a batch tensor carries a graph from before the call, the caller's backward should go through that graph
once, as the fast mode does, not once per chunk.  The table gives each mode's meta-step (encoder forward,
MAML forward, backward; median over repeats), how many times the encoder's backward ran per step
(counted), and the encoder's backward alone, timed in the same run: the floor of what a chunked mode
repeating it would pay per extra run.

    python benchmarks/maml_encoder_chunks.py            # T=16 tasks, encoder d=512, head d=64
    python benchmarks/maml_encoder_chunks.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import metakernels as mk  # noqa: E402

MODES = {"fast": {}, "task_chunk=4": {"task_chunk": 4}, "task_chunk=1": {"task_chunk": 1},
         "memory=low, task_chunk=4": {"memory": "low", "task_chunk": 4}}


class _Counted(torch.autograd.Function):
    """Identity whose backward counts its runs."""
    runs = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _Counted.runs += 1
        return grad


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--shots", type=int, default=32, help="support and query examples per task")
    ap.add_argument("--width", type=int, default=512, help="the encoder's width")
    ap.add_argument("--steps", type=int, default=2, help="K inner steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.shots, args.width, args.repeats = 4, 8, 64, 2
    return args


def main():
    args = parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    d, classes = args.width, 10
    encoder = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.GELU(), nn.Linear(d, 64))
    head = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, classes))
    raw = torch.randn(2, args.tasks, args.shots, d)
    labels = torch.randint(0, classes, (2, args.tasks, args.shots))

    def loss_fn(f, batch):
        x, y = batch
        return nn.functional.cross_entropy(f(x), y)

    def step(mode):
        features = _Counted.apply(encoder(raw))
        maml = mk.MAML(head, inner_lr=0.1, inner_steps=args.steps, **MODES[mode])
        maml(loss_fn, (features[0], labels[0]), (features[1], labels[1])).backward()

    def encoder_backward():
        encoder(raw).sum().backward()

    print(harness.machine_line(device))
    print(f"T={args.tasks}, {args.shots} support + {args.shots} query examples per task, encoder width {d}, "
          f"K={args.steps}, second order, float32")
    rows = []
    for mode in MODES:
        _Counted.runs = 0
        step(mode)
        runs = _Counted.runs
        ms = harness.median_ms(lambda: step(mode), device, repeats=args.repeats, warmup=1)
        rows.append([mode, f"{ms:.1f}", str(runs)])
    backward_ms = harness.median_ms(encoder_backward, device, repeats=args.repeats, warmup=1)
    rows.append(["encoder forward + backward alone", f"{backward_ms:.1f}", "1"])
    harness.print_table(["mode", "meta-step ms (median)", "encoder backward runs per step"], rows, args.markdown,
                        title="MAML with an encoder run before the call")


if __name__ == "__main__":
    main()
