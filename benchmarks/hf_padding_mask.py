"""MAML over a transformers BERT given padded batches: the 2D padding mask (transformers' mask test stops
torch.vmap, so the tasks run in a Python loop) against ``mk.additive_attention_mask`` (vmap over tasks),
side by side in one run, the two interleaved, with the largest meta-gradient difference between them.

    python benchmarks/hf_padding_mask.py            # T=16 tasks, 8 sequences of 32 tokens, BERT d=128, 2 layers
    python benchmarks/hf_padding_mask.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import metakernels as mk  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--sequences", type=int, default=8, help="support and query sequences per task")
    ap.add_argument("--length", type=int, default=32, help="tokens per sequence, the last quarter padding in half")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="K inner steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.sequences, args.length, args.width, args.repeats = 2, 2, 8, 16, 1
    return args


def main():
    args = parse_args()
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=args.width, num_hidden_layers=args.layers,
                                     num_attention_heads=4, intermediate_size=4 * args.width, num_labels=5,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    shape = (args.tasks, args.sequences, args.length)
    mask = torch.ones(shape, dtype=torch.long)
    mask[:, ::2, -(args.length // 4):] = 0
    batches = [(torch.randint(1, 1000, shape).masked_fill(mask == 0, 0), mask,
                torch.randint(0, 5, shape[:2])) for _ in range(2)]
    losses = {
        "2D mask, loop over tasks": (lambda f, b: f(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss, False),
        "additive_attention_mask, vmap": (lambda f, b: f(input_ids=b[0], labels=b[2],
                                                         attention_mask=mk.additive_attention_mask(b[1])).loss, True),
    }

    def step(name, first_order):
        loss_fn, vectorize = losses[name]
        model.zero_grad()
        maml = mk.MAML(model, inner_lr=0.05, inner_steps=args.steps, first_order=first_order, vectorize=vectorize)
        maml(loss_fn, *batches).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    print(harness.machine_line(torch.device("cpu")))
    print(f"BERT d={args.width}, {args.layers} layers; T={args.tasks}, {args.sequences} support + {args.sequences} "
          f"query sequences of {args.length} tokens per task; K={args.steps}; float32; medians of {args.repeats}, "
          "the two interleaved")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no batching rule" notes for SDPA under vmap
        for first_order in (False, True):
            grads = {name: step(name, first_order) for name in losses}  # also the warm-up
            times = {name: [] for name in losses}
            for _ in range(args.repeats):
                for name in losses:
                    start = time.perf_counter()
                    step(name, first_order)
                    times[name].append(1e3 * (time.perf_counter() - start))
            loop_ms = statistics.median(times["2D mask, loop over tasks"])
            reference = grads["2D mask, loop over tasks"]
            for name in losses:
                ms = statistics.median(times[name])
                difference = ((grads[name] - reference).abs().max() / reference.abs().max()).item()
                rows.append(["first" if first_order else "second", name, f"{ms:.0f}", f"{loop_ms / ms:.2f}x",
                             f"{difference:.1e}"])
    harness.print_table(["order", "mask", "meta-step ms", "speed-up", "max |grad diff| / max |grad|"], rows,
                        args.markdown, title="MAML over BERT with padded batches")


if __name__ == "__main__":
    main()
