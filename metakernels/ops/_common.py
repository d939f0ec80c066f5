"""Helpers every op module shares: the accumulation dtype (float64 stays float64, everything else
accumulates in float32, as the compiled kernels do) and freshly allocated outputs."""
from __future__ import annotations

import torch

from .. import _backend


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(acc_dtype(t.dtype))


def tl_acc(dtype: torch.dtype):
    """The Triton dtype of acc_dtype(dtype)."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def new_output(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device (``like``'s shape and dtype unless given), filled
    with NaN while the tests poison outputs (so that an element a kernel forgets to write shows)."""
    out = torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)
    if _backend.POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out
