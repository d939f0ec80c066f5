"""The learned optimizer's step over many parameter tensors: ``lopt.optimizer(params).step()`` with its
small tensors packed into one fused call (the default, metakernels.lopt_optim.PACK_UP_TO), the same with
one call per tensor, the same elements as a single tensor (the floor: one call, no concatenation), and
``torch.optim.Adam`` (foreach) on the same tensors for scale, side by side in one run.

Parameter lists: a hundred 768-element vectors (the per-call cost alone), and the tensors of a GPT-2-style
language model (d_model 256, 6 blocks, vocabulary 8192, context 512: 76 tensors, 7.0M elements, 50 of the
tensors of <= 1024 elements).

    python benchmarks/lopt_step_tensors.py             # CPU, hidden 4 and 32
    python benchmarks/lopt_step_tensors.py --quick     # a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def gpt_shapes(d: int, blocks: int, vocab: int, context: int) -> list[tuple[int, ...]]:
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (context, d)] + block * blocks + [(d,), (d,)]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_table_arguments(ap)
    ap.add_argument("--hidden", nargs="+", type=int, default=[4, 32])
    return ap.parse_args()


def main():
    args = parse_args()
    allocator = harness.reexec_with_malloc_tunables(not args.system_malloc and args.device == "cpu")
    import torch

    import metakernels as mk
    from metakernels import lopt_optim

    device = torch.device(args.device)
    repeats = 3 if args.quick else 15
    d, blocks, vocab, context = (64, 2, 512, 64) if args.quick else (256, 6, 8192, 512)
    lists = {"100 x 768": [(768,)] * 100, f"GPT d={d} x{blocks}, V={vocab}": gpt_shapes(d, blocks, vocab, context)}
    print(harness.machine_line(device))
    print(f"{allocator}; medians of {repeats} steps")

    def time_step(optimizer_of, shapes):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for p in params:
            p.grad = (0.01 * torch.randn(p.shape, generator=gen)).to(device)
        return harness.median_ms(optimizer_of(params).step, device, repeats, warmup=2)

    rows = []
    for hidden in args.hidden:
        lopt = mk.LearnedOptimizer(hidden=hidden, seed=0).to(device)
        for name, shapes in lists.items():
            elements = sum(torch.Size(s).numel() for s in shapes)
            packed = time_step(lopt.optimizer, shapes)
            default_pack = lopt_optim.PACK_UP_TO
            lopt_optim.PACK_UP_TO = 0
            try:
                alone = time_step(lopt.optimizer, shapes)
            finally:
                lopt_optim.PACK_UP_TO = default_pack
            single = time_step(lopt.optimizer, [(elements,)])
            adam = time_step(lambda ps: torch.optim.Adam(ps, foreach=True), shapes)
            for label, ms, tensors in (("learned, small tensors packed", packed, len(shapes)),
                                       ("learned, one call per tensor", alone, len(shapes)),
                                       ("learned, one tensor (floor)", single, 1),
                                       ("torch.optim.Adam (foreach)", adam, len(shapes))):
                rows.append([str(hidden), name, label, str(tensors), f"{elements:,}", f"{ms:.2f}",
                             f"{alone / ms:.2f}x"])
    header = ["hidden", "parameters", "implementation", "tensors", "elements", "step ms", "speed vs one call each"]
    harness.print_table(header, rows, args.markdown, title="learned-optimizer step over many tensors")


if __name__ == "__main__":
    main()
