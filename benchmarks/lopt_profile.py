"""Where the fused learned-optimizer step's time goes, kernel by kernel: torch.profiler over a few forward
and forward + meta-backward calls of each compiled backend (and eager), then per call

- the wall time (harness.median_ms, outside the profiler);
- each kernel's device time (on a GPU; on a CPU, each operator's own CPU time), largest first;
- their sum ("profiled"), and the wall time it leaves unexplained (launch gaps, host work between kernels).

It answers what lopt_table.py's totals cannot: which of the step's kernels (moments, per-segment sums,
the MLP, the backward's weight gradient, ...) sets the pace, and how much of a call is the host's.

    python benchmarks/lopt_profile.py --device cuda --sizes 1x10000000 16x1000000 --hidden 32 4
    python benchmarks/lopt_profile.py --quick          # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import lopt_table  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", nargs="+", default=["1x1000000"], help="TxP entries, e.g. 16x1000000")
    ap.add_argument("--hidden", nargs="+", type=int, default=[32])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--calls", type=int, default=5, help="profiled calls of each pass")
    ap.add_argument("--top", type=int, default=8, help="kernels listed per pass")
    ap.add_argument("--quick", action="store_true", help="one small size, a smoke run")
    return ap.parse_args(argv)


def kernel_times(torch, fn, device, calls):
    """[(name, calls per call, ms per call)] of what fn ran, largest first: device kernels on a GPU, the
    operators' own CPU time on a CPU (wrappers that only call other operators then take ~0)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities):  # not counted: the first profiled call carries
        fn()                                              # the profiler's start-up cost (8 ms here)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        harness.synchronize(device)
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, event.count / calls, us / 1e3 / calls))
    return sorted(rows, key=lambda row: -row[2])


def profile_one(torch, mk, device, hidden, layers, T, P, calls, top):
    def step(p, g, s, w):
        return mk.ops.learned_update(p, g, s, w, hidden=hidden, layers=layers)

    forward, forward_backward = lopt_table.step_passes(step, lopt_table.step_operands(device, T, P, hidden, layers))
    for backend in harness.compiled_backends(device) + ["reference"]:
        with mk.use_backend(backend):
            for label, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                wall = harness.median_ms(fn, device, repeats=calls, warmup=2)
                rows = kernel_times(torch, fn, device, calls)
                busy = sum(ms for _, _, ms in rows)
                print(f"\nhidden={hidden} {T}x{P} {backend} {label}: wall {wall:.3f} ms, profiled {busy:.3f} ms, "
                      f"unexplained {wall - busy:.3f} ms per call")
                for name, count, ms in rows[:top]:
                    print(f"  {ms:9.3f} ms {100 * ms / wall:5.1f}%  x{count:g}  {name[:110]}")


def main(argv=None):
    args = parse_args(argv)
    import torch

    import metakernels as mk

    device = torch.device(args.device)
    print(harness.machine_line(device))
    sizes = ["1x20000"] if args.quick else args.sizes
    for hidden in args.hidden:
        for size in sizes:
            T, P = (int(x) for x in size.split("x"))
            profile_one(torch, mk, device, hidden, args.layers, T, P, 2 if args.quick else args.calls, args.top)


if __name__ == "__main__":
    main()
