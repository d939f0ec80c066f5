"""The fused, twice-differentiable layers (metakernels.ops.layer_norm / rms_norm / bias_gelu) against
the eager PyTorch composition and torch.compile of it, side by side in one run: forward, backward (the
first derivative), and double backward (the derivative of the backward, what second-order MAML runs in
its meta-backward), with every operand batched over T tasks as the MAML engine calls them (per-task
weights [T, D]).  Bytes moved over the copy bandwidth measured in the same run give each kernel's
floor (the causal softmax's double backward runs its own backward once more to reach the scores:
8 tensors): these ops are memory-bound.

A second table does the same for the task-batched linear layer (metakernels.ops.task_linear against the
batched matmuls vmap runs for F.linear, [T, O, I] weights), whose floor is its FLOPs over the fp32 matmul
rate measured in the run, plus a fourth pass: the backward followed by the copy of the weight gradient
into rows of a flat [T, P] buffer, what the inner loop does with it next (the layout the op exists for).

A third table times the vocabulary head with cross-entropy (metakernels.ops.linear_cross_entropy, its
logits in chunks and recomputed in the backward passes) against the batched matmul + F.cross_entropy
that keeps the logits, at ``--vocab`` (32768 by default: the regime the chunked head is for), with the
same matmul-rate floor counting the products a head that keeps its logits needs (1, 2 and 6 per pass).

A fourth table times the causal attention core (metakernels.ops.causal_attention on a fused q|k|v
projection [T, 4 sequences, 32 positions, 3 D], 4 heads, as the benchmark LM's attention) against PyTorch's
composition (split, heads, matmul, masked softmax, matmul, merge) and torch.compile of it.  Its floor is the
larger of its products over the matmul rate (2, 4 and 10 per head per pass) and its minimal traffic over
the copy bandwidth (5, 8 and 14 output-sized tensors: q|k|v and its cotangents count 3, the weights P, G
and dZ one each at S = d_head).

    python benchmarks/layers_table.py            # the MAML benchmark's shapes (T=16, 128 rows, D=128 / 512)
    python benchmarks/layers_table.py --quick    # small shapes, a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--rows", type=int, default=128, help="rows per task (sequences x tokens)")
    ap.add_argument("--width", type=int, default=128, help="D of the norms; the GELU runs at 4 D")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--vocab", type=int, default=32768, help="V of the vocabulary head table")
    ap.add_argument("--head-repeats", type=int, default=5, help="repeats of the (slow, at 32k) head table")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile time on a GPU)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's defaults (see harness.py)")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.rows, args.width, args.repeats, args.vocab, args.head_repeats = 4, 32, 64, 5, 1000, 3
    return args


def layers():
    """name -> (ours(x, w, b), eager(x, w, b), width multiplier, element-sized tensors moved by
    (forward, backward, double backward))."""
    import torch.nn.functional as F

    import metakernels as mk

    return {
        "layernorm": (lambda x, w, b: mk.ops.layer_norm(x, w, b),
                      lambda x, w, b: F.layer_norm(x, x.shape[-1:]) * w.unsqueeze(1) + b.unsqueeze(1), 1, (2, 3, 5)),
        "rmsnorm": (lambda x, w, b: mk.ops.rms_norm(x, w),
                    lambda x, w, b: F.rms_norm(x, x.shape[-1:], eps=1e-6) * w.unsqueeze(1), 1, (2, 3, 5)),
        "bias+gelu": (lambda x, w, b: mk.ops.bias_gelu(x, b),
                      lambda x, w, b: F.gelu(x + b.unsqueeze(1)), 4, (2, 4, 6)),
        # rows x width scores as one causal [S_q = rows, S_k = width] block per task (square by default)
        "causal softmax": (lambda x, w, b: mk.ops.causal_softmax(x, 0.25), _eager_causal_softmax, 1, (2, 3, 8)),
    }


def _eager_causal_softmax(x, w, b):
    import torch

    hidden = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).triu(x.shape[-1] - x.shape[-2] + 1)
    return torch.softmax((x * 0.25).masked_fill(hidden, float("-inf")), -1)


def linear_shapes(width: int) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of the benchmark LM's linear layers at model width ``width``."""
    return {"linear qkv": (width, 3 * width), "linear mlp up": (width, 4 * width), "linear mlp down": (4 * width, width)}


def _eager_linear(x, w, b):
    """What vmap over per-task weights runs for F.linear: one batched matmul plus the bias."""
    import torch

    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def backward_and_pack_ms(fn, x, w, b, device, repeats):
    """Median ms of the backward (all three gradients, as in the inner loop) plus the copy of the weight's
    into rows of a flat [T, P] buffer."""
    import torch

    T, O, I = w.shape
    flat_rows = torch.empty(T, O * I + 1024, device=w.device)[:, 512:512 + O * I].view(T, O, I)
    y = fn(x, w, b)
    g = torch.randn_like(y)
    return harness.median_ms(lambda: flat_rows.copy_(torch.autograd.grad(y, (x, w, b), g, retain_graph=True)[1]),
                             device, repeats)


def linear_rows(args, device, gen) -> tuple[list[list[str]], dict[str, float]]:
    import torch

    import metakernels as mk

    rates = harness.matmul_rates(device)
    rate = harness.matmul_ceiling(rates)[1]
    rows = []
    for name, (I, O) in linear_shapes(args.width).items():
        x = torch.randn(args.tasks, args.rows, I, generator=gen).to(device).requires_grad_()
        w = torch.randn(args.tasks, O, I, generator=gen).to(device).requires_grad_()
        b = torch.randn(args.tasks, O, generator=gen).to(device).requires_grad_()
        variants = {"eager": _eager_linear, "ours": mk.ops.task_linear}
        if not args.no_compile:
            variants["compile"] = torch.compile(_eager_linear, dynamic=False)
        results = {label: (*timings(fn, x, w, b, device, args.repeats),
                           backward_and_pack_ms(fn, x, w, b, device, args.repeats)) for label, fn in variants.items()}
        product_flops = 2 * args.tasks * args.rows * I * O
        for i, (pass_name, products) in enumerate((("forward", 1), ("backward", 2), ("double backward", 4),
                                                   ("backward + dW into flat rows", 2))):
            rows.append(_row(name, pass_name, i, results, products * product_flops / rate / 1e6))
    return rows, rates


def _eager_head(targets):
    """The head that keeps its logits: one batched matmul plus the bias, then F.cross_entropy per task."""
    import torch.nn.functional as F

    def head(h, w, b):
        logits = _eager_linear(h, w, b)
        T, R, V = logits.shape
        return F.cross_entropy(logits.reshape(T * R, V), targets.reshape(-1), reduction="none").view(T, R).mean(1)

    return head


def head_rows(args, device, gen, rate) -> list[list[str]]:
    import torch

    import metakernels as mk

    T, R, D, V = args.tasks, args.rows, args.width, args.vocab
    h = torch.randn(T, R, D, generator=gen).to(device).requires_grad_()
    w = (0.1 * torch.randn(T, V, D, generator=gen)).to(device).requires_grad_()
    b = torch.zeros(T, V).to(device).requires_grad_()
    targets = torch.randint(0, V, (T, R), generator=gen).to(device)
    eager = _eager_head(targets)
    variants = {"eager": eager, "ours": lambda h, w, b: mk.ops.linear_cross_entropy(h, w, b, targets)}
    if not args.no_compile:
        variants["compile"] = torch.compile(eager, dynamic=False)
    results = {label: timings(fn, h, w, b, device, args.head_repeats) for label, fn in variants.items()}
    product_flops = 2 * T * R * V * D
    return [_row(f"vocab head V={V}", pass_name, i, results, products * product_flops / rate / 1e6)
            for i, (pass_name, products) in enumerate((("forward", 1), ("backward", 2), ("double backward", 6)))]


def _eager_attention(qkv, n_heads):
    """PyTorch's composition, as metakernels.models.CausalSelfAttention writes it."""
    import torch

    *lead, S, width = qkv.shape
    D = width // 3
    q, k, v = (t.reshape(*lead, S, n_heads, D // n_heads).transpose(-3, -2) for t in qkv.split(D, -1))
    hidden = torch.ones(S, S, dtype=torch.bool, device=qkv.device).triu(1)
    scores = (q @ k.transpose(-2, -1) * (D // n_heads) ** -0.5).masked_fill(hidden, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(-3, -2).reshape(*lead, S, D)


def attention_rows(args, device, gen, rate, bandwidth) -> list[list[str]]:
    import torch

    import metakernels as mk

    heads, seqs, S = 4, 4, args.rows // 4
    qkv = torch.randn(args.tasks, seqs, S, 3 * args.width, generator=gen).to(device).requires_grad_()
    unused = torch.zeros(1, device=device, requires_grad=True)  # timings' weight and bias slots
    eager = lambda x, w, b: _eager_attention(x, heads)  # noqa: E731
    variants = {"eager": eager, "ours": lambda x, w, b: mk.ops.causal_attention(x, heads)}
    if not args.no_compile:
        compiled = torch.compile(_eager_attention, dynamic=False)
        variants["compile"] = lambda x, w, b: compiled(x, heads)
    results = {label: timings(fn, qkv, unused, unused, device, args.repeats) for label, fn in variants.items()}
    product_flops = 2 * args.tasks * seqs * S * S * args.width
    out_bytes = qkv.numel() // 3 * 4
    return [_row("causal attention", pass_name, i, results,
                 max(products * product_flops / rate, moved * out_bytes / bandwidth) / 1e6)
            for i, (pass_name, products, moved) in enumerate((("forward", 2, 5), ("backward", 4, 8),
                                                               ("double backward", 10, 14)))]


def _row(name, pass_name, i, results, floor):
    """A table row for pass number ``i`` of ``results`` (label -> per-pass ms) with its floor in ms."""
    e, o = results["eager"][i], results["ours"][i]
    c = results["compile"][i] if "compile" in results else "-"
    ratio = lambda t: f"{t / o:.2f}x" if isinstance(t, float) else "-"  # noqa: E731
    fmt = lambda t: f"{t:.3f}" if isinstance(t, float) else t  # noqa: E731
    return [name, pass_name, fmt(e), fmt(c), fmt(o), ratio(e), ratio(c), f"{floor:.3f}", f"{100 * floor / o:.0f}%"]


def timings(fn, x, w, b, device, repeats):
    """Median ms of (forward, backward, double backward) of fn at (x, w, b)."""
    import torch

    inputs = (x, w, b)
    fwd = harness.median_ms(lambda: fn(x, w, b), device, repeats)
    y = fn(x, w, b)
    g = torch.randn_like(y).requires_grad_()
    bwd = harness.median_ms(lambda: torch.autograd.grad(y, inputs, g, retain_graph=True, allow_unused=True), device,
                            repeats)
    try:
        first = [t for t in torch.autograd.grad(y, inputs, g, create_graph=True, allow_unused=True) if t is not None]
        cot = [torch.randn_like(t) for t in first]
        dbl = harness.median_ms(lambda: torch.autograd.grad(first, (x, w, g), cot, retain_graph=True, allow_unused=True),
                                device, repeats)
    except RuntimeError as exc:  # torch.compile refuses double backward
        dbl = "refused" if "double backward" in str(exc) else f"failed: {str(exc)[:40]}"
    return fwd, bwd, dbl


def main():
    args = parse_args()
    allocator = harness.reexec_with_malloc_tunables(enabled=not args.system_malloc and args.device == "cpu")
    import torch

    import metakernels as mk

    device = torch.device(args.device)
    bandwidth = harness.copy_bandwidth_gbs(device)
    print(harness.machine_line(device))
    print(f"T={args.tasks} tasks x {args.rows} rows, D={args.width} (GELU at {4 * args.width}), fp32, median of "
          f"{args.repeats}; copy bandwidth this run {bandwidth:.1f} GB/s (read + write); allocator: {allocator}; "
          f"metakernels backend: {mk._backend.select(device, 'layers_table')}")
    header = ["layer", "pass", "eager ms", "compile ms", "metakernels ms", "vs eager", "vs compile", "floor ms",
              "% of copy bw"]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (ours, eager, mult, moved) in layers().items():
        D = args.width * mult
        x = torch.randn(args.tasks, args.rows, D, generator=gen).to(device).requires_grad_()
        w = torch.randn(args.tasks, D, generator=gen).to(device).requires_grad_()
        b = torch.randn(args.tasks, D, generator=gen).to(device).requires_grad_()
        variants = {"eager": eager, "ours": ours}
        if not args.no_compile:
            variants["compile"] = torch.compile(eager, dynamic=False)
        results = {label: timings(fn, x, w, b, device, args.repeats) for label, fn in variants.items()}
        for i, pass_name in enumerate(("forward", "backward", "double backward")):
            rows.append(_row(name, pass_name, i, results, moved[i] * x.numel() * 4 / bandwidth / 1e6))
    harness.print_table(header, rows, args.markdown, title="fused twice-differentiable layers")
    rows, rates = linear_rows(args, device, gen)
    rate = harness.matmul_ceiling(rates)[1]
    print(f"\ntask-batched linear: {harness.describe_matmul(rates)} this run (the floor: FLOPs over the fastest)")
    header[-1] = "% of matmul rate"
    harness.print_table(header, rows, args.markdown, title="task-batched linear")
    print(f"\nvocabulary head with cross-entropy, V={args.vocab}, median of {args.head_repeats}")
    harness.print_table(header, head_rows(args, device, gen, rate), args.markdown, title="vocabulary head")
    print(f"\ncausal attention core, {args.tasks} tasks x 4 sequences x {args.rows // 4} positions, 4 heads of "
          f"{args.width // 4}: floor the larger of FLOPs over the matmul rate and bytes over the copy bandwidth")
    header[-1] = "% of roofline"
    harness.print_table(header, attention_rows(args, device, gen, rate, bandwidth), args.markdown,
                        title="causal attention")


if __name__ == "__main__":
    main()
