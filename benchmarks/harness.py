"""Timing and ceiling measurements shared by the benchmark scripts: medians over repeats, the machine's
copy bandwidth and matmul rate measured in the same run, and the allocator setting that lets CPU
benchmarks measure kernels rather than page faults."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

# glibc serves every allocation of >= 32 MB with a fresh mmap, so each new 64 MB output tensor is
# page-faulted (and zero-filled by the kernel) again: measured here, torch.clone of 64 MB ran at
# ~4 GB/s against ~25 GB/s for copy_ into an existing tensor.  With mmap disabled and trimming off,
# freed blocks are reused as in a steady training loop; eager PyTorch and every backend benefit alike.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000"
_REEXEC_FLAG = "METAKERNELS_BENCH_REEXEC"


def reexec_with_malloc_tunables(enabled: bool) -> str:
    """Re-runs this script with MALLOC_TUNABLES (once); returns a line saying which allocator runs."""
    if enabled and os.environ.get(_REEXEC_FLAG) is None and platform.system() == "Linux":
        env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, **{_REEXEC_FLAG: "1"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    tunables = os.environ.get("GLIBC_TUNABLES")
    return f"glibc malloc with GLIBC_TUNABLES={tunables}" if tunables else "glibc malloc defaults (mmap per large tensor)"


def add_table_arguments(ap, device: str = "cpu") -> None:
    """The options of the learned-optimizer table scripts: --device, --quick, --system-malloc, --markdown."""
    ap.add_argument("--device", default=device)
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's defaults (see harness.py)")
    ap.add_argument("--markdown", action="store_true")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def compiled_backends(device: torch.device) -> list[str]:
    """The metakernels backends other than the reference that can run on ``device``: cpu on a CPU; cuda
    and triton on a GPU (triton under its interpreter is a correctness tool, not timed)."""
    from metakernels import _backend

    candidates = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    return [name for name in candidates if _backend._why_unavailable(name, device) is None]


def copy_bandwidth_gbs(device: torch.device, n_elements: int | None = None, repeats: int = 15) -> float:
    """Bytes read + written per second by copy_ between two existing fp32 tensors (16M elements on a CPU,
    256M on a GPU, whose 50-60 MB L2 would hold a smaller pair)."""
    n_elements = n_elements or (256_000_000 if device.type == "cuda" else 16_000_000)
    src = torch.randn(n_elements, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _cpu_products(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The fp32 CPU implementations of a @ b besides torch.mm that this process can run, by name."""
    products = {}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        b_t = b.t().contiguous()  # the linear's weight is [out, in]
        products["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")
    from metakernels._backend import extension

    ext = extension()
    if ext is not None and ext.task_matmul_available():
        out = torch.empty(1, a.shape[0], b.shape[1])

        def kernel():
            ext.task_matmul(a[None], b[None], None, out)
            return out[0]

        products["metakernels kernel"] = kernel
    return products


def matmul_rates(device: torch.device, n: int | None = None, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of an fp32 n x n product (n = 1024 on a CPU; 8192 on a GPU, in plain fp32 as the
    per-parameter MLPs run, under torch's default of TF32 off) by each implementation this process can
    run: torch.mm (the BLAS) and, on the CPU, oneDNN (torch.ops.mkldnn._linear_pointwise, where torch
    has it) and metakernels' own product kernel (where this CPU runs it).  They can differ by 2x: on the
    Zen 5 hosts here MKL runs 256-bit code (170-240 GFLOP/s on two threads) where oneDNN and the kernel
    use the 512-bit FMA units (400-550; RESULTS.md, eleventh and twentieth sessions).  An implementation
    whose product disagrees with torch.mm's is not counted."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    products = {"torch.mm": lambda: a @ b}
    if device.type == "cpu":
        reference = a @ b
        for name, product in _cpu_products(a, b).items():
            if torch.allclose(product(), reference, rtol=1e-4, atol=1e-3 * n**0.5):
                products[name] = product
    return {name: 2 * n**3 / median_ms(product, device, repeats) / 1e6 for name, product in products.items()}


def matmul_ceiling(rates: dict[str, float]) -> tuple[str, float]:
    """The fastest of matmul_rates' implementations and its GFLOP/s: the ceiling of a FLOP-bound kernel."""
    return max(rates.items(), key=lambda item: item[1])


def describe_matmul(rates: dict[str, float]) -> str:
    """'fp32 matmul 426 GFLOP/s (metakernels kernel; torch.mm 185, oneDNN 401)': the ceiling and the others."""
    best, rate = matmul_ceiling(rates)
    others = ", ".join(f"{name} {r:.0f}" for name, r in rates.items() if name != best)
    return f"fp32 matmul {rate:.0f} GFLOP/s ({best}" + (f"; {others})" if others else ")")


def machine_line(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return (
        f"device={device} ({name}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"python {platform.python_version()}"
    )


TABLES_ENV = "METAKERNELS_BENCH_TABLES"  # set by `python -m metakernels bench`: where tables are also saved


def print_table(header, rows, markdown: bool, title: str = "") -> None:
    """A table of strings: markdown, or right-aligned plain columns.  When $METAKERNELS_BENCH_TABLES names
    a file, the table is also appended to it as one JSON line {"title", "header", "rows"}."""
    if os.environ.get(TABLES_ENV):
        with open(os.environ[TABLES_ENV], "a", encoding="utf-8") as f:
            f.write(json.dumps({"title": title, "header": list(header), "rows": [list(map(str, r)) for r in rows]}) + "\n")
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))
