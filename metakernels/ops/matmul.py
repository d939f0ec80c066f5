"""Task-batched float32 products on the CPU: metakernels' kernel or the vendor BLAS.

    task_bmm(a, b, start=None)   # a [B, M, K], b [B, K, N], start None or [B, 1 | M, N] -> [B, M, N]

is ``torch.baddbmm(start, a, b)`` (``torch.bmm`` without start).  Where the operands are float32 CPU
tensors that need no autograd record, it may run ``metakernels._C.task_matmul`` instead: an AVX-512
kernel (csrc/cpu/matmul.cpp) that reads transposed operands through their strides.  It exists because
MKL runs 256-bit kernels on AMD CPUs: on a Zen 5 EPYC (512-bit FMA units) it reached 400-530 GFLOP/s on
the inner loop's shapes against MKL's 210-235 (benchmarks/RESULTS.md).  Elsewhere the BLAS may be the
faster one, so which runs is decided once per process:

    METAKERNELS_CPU_MATMUL=auto    (default) the kernel where it can run and, timed once on a
                                   [16, 128, 128] x [16, 128, 512] product, takes at most 0.8x the
                                   BLAS's time; the BLAS otherwise
    METAKERNELS_CPU_MATMUL=kernel  the kernel wherever it can run (AVX-512)
    METAKERNELS_CPU_MATMUL=blas    always torch.bmm / torch.baddbmm

and ``with use_policy("blas"):`` sets it for a block.

Both sum each product over k in float32; results differ from the BLAS's in the last bits only (the
BLAS may order or block the sums differently), and one process always uses the same path.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from .._backend import extension, forced_backend

POLICIES = ("auto", "kernel", "blas")
_KERNEL_SPEEDUP_NEEDED = 1.25
_choice: bool | None = None  # the auto policy's decision, once made: whether the kernel runs
_forced: str | None = None  # use_policy's


def _policy() -> str:
    policy = os.environ.get("METAKERNELS_CPU_MATMUL", "auto")
    if policy not in POLICIES:
        raise ValueError(f"METAKERNELS_CPU_MATMUL must be one of {POLICIES}, got {policy!r}")
    return policy


def _kernel_available() -> bool:
    ext = extension()
    return ext is not None and ext.task_matmul_available()


def _median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def _kernel_is_faster() -> bool:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 128, 128, generator=gen), torch.randn(16, 128, 512, generator=gen)
    out = torch.empty(16, 128, 512)
    ext = extension()
    kernel = _median_seconds(lambda: ext.task_matmul(a, b, None, out))
    blas = _median_seconds(lambda: torch.bmm(a, b, out=out))
    return kernel * _KERNEL_SPEEDUP_NEEDED <= blas


def kernel_chosen() -> bool:
    """Whether float32 CPU task products run on metakernels' kernel now (auto: decided on first call)."""
    global _choice
    policy = _forced or _policy()
    if policy != "auto":
        return policy == "kernel" and _kernel_available()
    if _choice is None:
        _choice = _kernel_available() and _kernel_is_faster()
    return _choice


@contextlib.contextmanager
def use_policy(policy: str):
    """Runs the block's products under ``policy`` ("auto", "kernel" or "blas") instead of
    METAKERNELS_CPU_MATMUL's (this process)."""
    global _forced
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    previous, _forced = _forced, policy
    try:
        yield
    finally:
        _forced = previous


def reset_choice() -> None:
    """Forget the auto policy's decision (after set_cpu_avx512, or to time again)."""
    global _choice
    _choice = None


def _kernel_applies(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor | None) -> bool:
    operands = (a, b) if start is None else (a, b, start)
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or t.dim() != 3 for t in operands):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in operands):
        return False  # the kernel records nothing for autograd
    if forced_backend() not in (None, "cpu"):
        return False  # the reference backend is plain PyTorch
    if start is not None and (start.shape[0] != a.shape[0] or start.shape[1] not in (1, a.shape[1])
                              or start.shape[2] != b.shape[2] or (start.stride(2) != 1 and b.shape[2] > 1)):
        return False
    return kernel_chosen()


def task_bmm(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``start + a @ b`` per batch item (``torch.baddbmm``; ``torch.bmm`` without start), written into
    ``out`` ([B, M, N], rows contiguous) when given.  ``out`` may be ``start`` itself (accumulation in
    place); it must not overlap ``a`` or ``b``."""
    if _kernel_applies(a, b, start):
        if out is None:
            out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
        extension().task_matmul(a, b, start, out)
        return out
    if start is None:
        return torch.bmm(a, b) if out is None else torch.bmm(a, b, out=out)
    if out is start:
        return out.baddbmm_(a, b)
    return torch.baddbmm(start, a, b) if out is None else torch.baddbmm(start, a, b, out=out)
