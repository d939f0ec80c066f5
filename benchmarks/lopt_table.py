"""Side-by-side table of the fused learned-optimizer step (metakernels.ops.learned_update): each
available compiled backend against eager PyTorch (the reference composition and its autograd) and
``torch.compile`` of it, forward and forward + meta-backward, and the optimizer step alone
(``lopt.optimizer([p]).step()``), with the FLOP rate against the fp32 matmul rate and the bytes against
the copy bandwidth, both measured in the same run.  The matmul rate is the fastest fp32 product the process
can run (harness.matmul_rates: torch.mm, oneDNN, metakernels' product kernel), not the BLAS's alone: on
the Zen 5 hosts here MKL reaches less than half the rate of the other two.

FLOPs: 2 per multiply-add of the per-parameter MLP; forward 2 M, forward + backward 6 M per element
(M = 9 H + (layers - 1) H^2 + 2 H multiply-adds; the fused backward's recomputed forward is not counted).
Bytes (fp32, each distinct tensor once): forward 10 x 4 B per element (p, g, 4 state planes ->
p', 4 planes), forward + backward 27 x 4 B (+ p, g, 4 planes, the cotangents of p' and the 4 planes ->
cotangents of p, g and the 4 planes).

    python benchmarks/lopt_table.py            # CPU, P = 1e5, 1e6, 1e7 with T = 1 and 16 (T*P <= 1.6e7); eager
                                               # is skipped where it would not fit in memory
    python benchmarks/lopt_table.py --quick    # small sizes, a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

DEFAULT_SIZES = ["1x100000", "16x100000", "1x1000000", "16x1000000", "1x10000000"]
QUICK_SIZES = ["1x100000", "4x100000"]
COMPILE_P = 1_000_000  # torch.compile is timed at the reference size only, T = 1 (minutes to compile)


def eager_peak_bytes(elements: int, hidden: int) -> int:
    """Estimated peak of the eager reference's forward + backward: ~(420 + 11 hidden) B per element
    (ru_maxrss over one run at P = 1e6, 2026-11-30: 462 B at hidden=4, 774 B at hidden=32), twice over
    for the steady-state allocator, which keeps every freed block (harness.MALLOC_TUNABLES).  At
    16 x 1e6, hidden=32 that is ~25 GB: the default sizes in one process were OOM-killed on a 24.7 GB
    machine before this check (alone, that size peaked at 24.5 GB and survived)."""
    return 2 * elements * (420 + 11 * hidden)


def memory_bytes(device) -> int:
    """The memory the eager reference allocates from: the GPU's on a GPU, else the machine's."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def step_operands(device, T: int, P: int, hidden: int, layers: int):
    """(params [T, P], grads, state [4, T, P], weights) of the benchmarked step, the same in every run."""
    import torch

    from metakernels.ops.learned_update import num_weights

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(T, P, generator=gen).to(device)
    g = (0.01 * torch.randn(T, P, generator=gen)).to(device)
    s = torch.zeros(4, T, P, device=device)
    s[3] = 1e-4
    w = (0.3 * torch.randn(num_weights(hidden, layers), generator=gen)).to(device)
    return p, g, s, w


def step_passes(fn, operands):
    """(forward, forward_backward): fn(params, grads, state, weights) -> (params', state') run without
    autograd, and run with the meta-backward to all four inputs (on copies that require grad)."""
    import torch

    leaves = [x.clone().requires_grad_() for x in operands]

    def forward():
        with torch.no_grad():
            fn(*operands)

    def forward_backward():
        new_p, new_s = fn(*leaves)
        torch.autograd.grad((new_p, new_s), leaves, (torch.ones_like(new_p), torch.ones_like(new_s)))

    return forward, forward_backward


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_table_arguments(ap)
    ap.add_argument("--sizes", nargs="+", default=None, help="TxP entries, e.g. 16x1000000")
    ap.add_argument("--hidden", nargs="+", type=int, default=[4, 32])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    return ap.parse_args()


def main():
    args = parse_args()
    allocator = harness.reexec_with_malloc_tunables(not args.system_malloc and args.device == "cpu")
    import torch

    import metakernels as mk
    from metakernels.ops.learned_update import flops_per_element

    device = torch.device(args.device)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    repeats = 3 if args.quick else 7
    fused = harness.compiled_backends(device)
    rates = harness.matmul_rates(device)
    matmul = harness.matmul_ceiling(rates)[1]
    copy = harness.copy_bandwidth_gbs(device)
    print(harness.machine_line(device))
    print(f"{allocator}; {harness.describe_matmul(rates)}, copy {copy:.1f} GB/s (same run); medians of {repeats}")

    rows = []
    for hidden in args.hidden:
        flops = flops_per_element(hidden, args.layers)
        for size in sizes:
            T, P = (int(x) for x in size.split("x"))
            operands = step_operands(device, T, P, hidden, args.layers)
            N = T * P

            def step(p_, g_, s_, w_):
                return mk.ops.learned_update(p_, g_, s_, w_, hidden=hidden, layers=args.layers)

            def timings(fn, label):
                forward, forward_backward = step_passes(fn, operands)
                fwd = harness.median_ms(forward, device, repeats, warmup=2)
                fb = harness.median_ms(forward_backward, device, repeats, warmup=2)
                print(f"hidden={hidden} {size} {label}: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms",
                      file=sys.stderr, flush=True)
                rows.append(dict(hidden=hidden, size=size, impl=label, fwd=fwd, fb=fb,
                                 fwd_gflops=flops["forward"] * N / fwd / 1e6,
                                 fb_gflops=(flops["forward"] + flops["backward"]) * N / fb / 1e6,
                                 fwd_floor=10 * 4 * N / copy / 1e6, fb_floor=27 * 4 * N / copy / 1e6))

            for backend in fused:
                with mk.use_backend(backend):
                    timings(step, backend)
            need, have = eager_peak_bytes(N, hidden), memory_bytes(device)
            if need > 0.75 * have:
                print(f"hidden={hidden} {size}: eager and torch.compile skipped, their forward + backward would "
                      f"need ~{need / 1e9:.0f} GB of the {have / 1e9:.0f} GB here")
            else:
                with mk.use_backend("reference"):
                    timings(step, "eager")
                    if not args.no_compile and P == COMPILE_P and T == 1:
                        torch._dynamo.reset()
                        timings(torch.compile(step), "torch.compile")
            rows.extend(optimizer_rows(mk, torch, device, fused, hidden, args.layers, size, T, P, repeats, flops,
                                       copy))
    print_results(rows, matmul, args.markdown)


def optimizer_rows(mk, torch, device, fused, hidden, layers, size, T, P, repeats, flops, copy):
    """lopt.optimizer([p]).step() on one [T * P] parameter, with each compiled backend and eager."""
    out = []
    lopt = mk.LearnedOptimizer(hidden=hidden, layers=layers, seed=0).to(device)
    labels = [(backend, f"optimizer.step {backend}") for backend in fused]
    for backend, label in labels + [("reference", "optimizer.step eager")]:
        param = torch.nn.Parameter(torch.randn(T * P, device=device))
        param.grad = 0.01 * torch.randn(T * P, device=device)
        opt = lopt.optimizer([param])
        with mk.use_backend(backend):
            ms = harness.median_ms(opt.step, device, repeats, warmup=2)
        print(f"hidden={hidden} {size} {label}: {ms:.3f} ms", file=sys.stderr, flush=True)
        out.append(dict(hidden=hidden, size=size, impl=label, fwd=ms, fb=None,
                        fwd_gflops=flops["forward"] * T * P / ms / 1e6, fb_gflops=None,
                        fwd_floor=10 * 4 * T * P / copy / 1e6, fb_floor=None))
    return out


def print_results(rows, matmul, markdown):
    header = ["hidden", "T x P", "implementation", "fwd ms", "fwd GFLOP/s (% matmul)", "fwd / byte floor",
              "fwd vs eager", "fwd+bwd ms", "fwd+bwd GFLOP/s (% matmul)", "fwd+bwd / byte floor", "fwd+bwd vs eager"]
    eager = {(r["hidden"], r["size"], r["impl"]): r for r in rows if r["impl"].endswith("eager")}
    lines = []
    for r in rows:
        baseline = "optimizer.step eager" if r["impl"].startswith("optimizer") else "eager"
        e = eager.get((r["hidden"], r["size"], baseline))
        fb = r["fb"]
        lines.append([
            str(r["hidden"]), r["size"], r["impl"], f"{r['fwd']:.2f}",
            f"{r['fwd_gflops']:.1f} ({100 * r['fwd_gflops'] / matmul:.0f}%)", f"{r['fwd'] / r['fwd_floor']:.1f}x",
            "-" if e is None else f"{e['fwd'] / r['fwd']:.2f}x", "-" if fb is None else f"{fb:.2f}",
            "-" if fb is None else f"{r['fb_gflops']:.1f} ({100 * r['fb_gflops'] / matmul:.0f}%)",
            "-" if fb is None else f"{fb / r['fb_floor']:.1f}x",
            "-" if fb is None or e is None else f"{e['fb'] / fb:.2f}x",
        ])
    harness.print_table(header, lines, markdown, title="fused learned-optimizer step")

if __name__ == "__main__":
    main()
