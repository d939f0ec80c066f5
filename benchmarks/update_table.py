"""Side-by-side table of the fused update ops: each available backend against eager PyTorch (the
reference composition, e.g. ``params - lr * grads`` and its autograd), ``torch._foreach_*`` over the T
task rows, and optionally ``torch.compile`` of the eager composition; forward and forward+backward,
with achieved GB/s next to the copy bandwidth measured in the same run.

Bytes are counted as each distinct tensor read once and written once (all operands [T, P], lr a
number, every input requiring grad, a cotangent given for every output; the params cotangent is the
incoming one and moves no bytes):
    sgd       fwd 3 N   fwd+bwd 5 N      (p, g -> p';  + gp -> dg)
    momentum  fwd 5 N   fwd+bwd 9 N      (p, g, b -> p', b';  + gp, gb -> dg, db)
    adam      fwd 7 N   fwd+bwd 13 N     (p, g, m, v -> p', m', v';  + gp, gm, gv -> dg, dm, dv)

    python benchmarks/update_table.py                  # CPU, the default sizes
    python benchmarks/update_table.py --quick          # small sizes, a smoke run
    python benchmarks/update_table.py --compile        # add torch.compile (slow to compile)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

OPS = ("sgd", "momentum", "adam")
TENSORS_FWD = {"sgd": 3, "momentum": 5, "adam": 7}
TENSORS_FWD_BWD = {"sgd": 5, "momentum": 9, "adam": 13}
DEFAULT_SIZES = ["16x10000", "16x100000", "16x1000000", "1x16000000"]
QUICK_SIZES = ["16x10000", "4x100000"]
HYPER = {"lr": 0.01, "momentum": 0.9, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step": 3}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--sizes", nargs="+", default=None, help="TxP entries, e.g. 16x1000000")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the eager composition")
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's defaults (see harness.py)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return ap.parse_args()


def _cuda_available():
    import torch

    return torch.cuda.is_available()


def make_inputs(op, T, P, device, requires_grad):
    import torch

    def t(positive=False):
        x = torch.rand(T, P, device=device) if positive else torch.randn(T, P, device=device)
        return x.requires_grad_(requires_grad)

    tensors = {"params": t(), "grads": t()}
    if op == "momentum":
        tensors["buf"] = t()
    if op == "adam":
        tensors["m"], tensors["v"] = t(), t(positive=True)
    return tensors


def fused_call(op):
    import metakernels as mk

    if op == "sgd":
        return lambda p, g: (mk.ops.sgd_update(p, g, HYPER["lr"]),)
    if op == "momentum":
        return lambda p, g, b: mk.ops.momentum_update(p, g, b, HYPER["lr"], HYPER["momentum"])
    return lambda p, g, m, v: mk.ops.adam_update(p, g, m, v, HYPER["step"], HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"])


def eager_call(op):
    """The plain composition users write (what the reference backend runs)."""
    lr, mu, b1, b2, eps, step = (HYPER[k] for k in ("lr", "momentum", "beta1", "beta2", "eps", "step"))
    c1, c2 = 1 - b1**step, 1 - b2**step
    if op == "sgd":
        return lambda p, g: (p - lr * g,)
    if op == "momentum":
        def momentum(p, g, b):
            b = mu * b + g
            return p - lr * b, b
        return momentum

    def adam(p, g, m, v):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        return p - lr * (m / c1) / ((v / c2).sqrt() + eps), m, v
    return adam


def foreach_call(op):
    """The same math with torch._foreach_* over the T task rows (one list entry per task)."""
    import torch

    lr, mu, b1, b2, eps, step = (HYPER[k] for k in ("lr", "momentum", "beta1", "beta2", "eps", "step"))
    c1, c2 = 1 - b1**step, 1 - b2**step

    def rows(x):
        return list(x.unbind(0))

    if op == "sgd":
        return lambda p, g: tuple(torch._foreach_add(rows(p), rows(g), alpha=-lr))
    if op == "momentum":
        def momentum(p, g, b):
            b_new = torch._foreach_add(torch._foreach_mul(rows(b), mu), rows(g))
            return tuple(torch._foreach_add(rows(p), b_new, alpha=-lr)) + tuple(b_new)
        return momentum

    def adam(p, g, m, v):
        gs = rows(g)
        m_new = torch._foreach_add(torch._foreach_mul(rows(m), b1), gs, alpha=1 - b1)
        v_new = torch._foreach_add(torch._foreach_mul(rows(v), b2), torch._foreach_mul(gs, gs), alpha=1 - b2)
        denom = torch._foreach_add(torch._foreach_sqrt(torch._foreach_div(v_new, c2)), eps)
        step_ = torch._foreach_div(torch._foreach_div(m_new, c1), denom)
        return tuple(torch._foreach_add(rows(p), step_, alpha=-lr)) + tuple(m_new) + tuple(v_new)
    return adam


def time_variant(fn, op, T, P, device, repeats):
    """(forward ms, forward+backward ms) of fn, or None where the variant cannot run that mode."""
    import torch

    inputs = make_inputs(op, T, P, device, requires_grad=False)
    args = list(inputs.values())
    with torch.no_grad():
        fwd = harness.median_ms(lambda: fn(*args), device, repeats)
    grad_inputs = [a.detach().requires_grad_() for a in args]
    outs = fn(*grad_inputs)
    cotangents = [torch.randn_like(o) for o in outs]

    def fwd_bwd():
        return torch.autograd.grad(fn(*grad_inputs), grad_inputs, cotangents)

    try:
        fwd_bwd()
    except RuntimeError as exc:  # e.g. a foreach op without a derivative in this torch
        return fwd, None, f"{type(exc).__name__}: {str(exc)[:60]}"
    return fwd, harness.median_ms(fwd_bwd, device, repeats), None


def variants(op, device):
    import torch

    import metakernels as mk

    out = [("eager", eager_call(op)), ("foreach", foreach_call(op))]
    for name in harness.compiled_backends(device):
        def run(*a, _name=name, _fn=fused_call(op)):
            with mk.use_backend(_name):
                return _fn(*a)
        out.append((f"mk:{name}", run))
    return out, torch


def main():
    args = parse_args()
    allocator = harness.reexec_with_malloc_tunables(enabled=not args.system_malloc and args.device == "cpu")
    import torch

    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 15)
    sizes = [tuple(int(x) for x in s.split("x")) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))]
    bandwidth = harness.copy_bandwidth_gbs(device, repeats=repeats)
    print(harness.machine_line(device))
    print(f"allocator: {allocator}")
    print(f"measured copy bandwidth: {bandwidth:.1f} GB/s (bytes read + written by copy_, median of {repeats})")
    rows = []
    for op in args.ops:
        for T, P in sizes:
            table = []
            candidates, _ = variants(op, device)
            if args.compile:
                candidates.append(("torch.compile", torch.compile(eager_call(op), dynamic=False)))
            for name, fn in candidates:
                fwd, fwd_bwd, note = time_variant(fn, op, T, P, device, repeats)
                table.append((name, fwd, fwd_bwd, note))
            eager_fwd, eager_fb = table[0][1], table[0][2]
            elem_bytes = T * P * 4
            for name, fwd, fb, note in table:
                gbs_f = TENSORS_FWD[op] * elem_bytes / fwd / 1e6
                row = [op, f"{T}x{P}", name, f"{fwd:.3f}", f"{gbs_f:.1f}", f"{100 * gbs_f / bandwidth:.0f}%", f"{eager_fwd / fwd:.2f}x"]
                if fb is None:
                    row += ["n/a", "", "", note or ""]
                else:
                    gbs_b = TENSORS_FWD_BWD[op] * elem_bytes / fb / 1e6
                    row += [f"{fb:.3f}", f"{gbs_b:.1f}", f"{100 * gbs_b / bandwidth:.0f}%", f"{eager_fb / fb:.2f}x"]
                rows.append(row)
    header = ["op", "TxP", "variant", "fwd ms", "fwd GB/s", "fwd %copy", "fwd vs eager",
              "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd %copy", "fwd+bwd vs eager"]
    harness.print_table(header, rows, args.markdown, title=f"fused update ops on {args.device}")


if __name__ == "__main__":
    main()
