"""Cross-entropy row kernels of the chunked vocabulary head (metakernels.ops.vocab_head): the element-wise
passes over one chunk of logits, fused and in place.

On a contiguous chunk z of logits [..., V] (rows along the last dimension; M rows) and its tangent u, with
per-row lse, targets y (int64, in [0, V)) and coefficients c (each [M], contiguous, z's dtype but y):

    forward(z) -> lse                        lse = log sum_j exp(z_j)
    backward_(z, lse, y, c)                  z_j <- c (exp(z_j - lse) - [j = y])                 (delta)
    double_backward_(z, u, lse, y, c) -> r   p_j = exp(z_j - lse),  <p, u> = sum_j p_j u_j:
                                             r = <p, u> - u_y,   u_j <- c (u_j - <p, u>) p_j    (s),
                                             z_j <- c (p_j - [j = y])                           (delta)

Each is one kernel (C++ CPU, CUDA, Triton, and the plain-PyTorch reference below) that reads a row once
or twice (p is recomputed from z, never stored rounded), where the PyTorch composition made four to
eight passes over the whole chunk.  Accumulation in float32 (float64 for float64).
"""
from __future__ import annotations

import torch

from ._common import to_acc
from ._task_batch import run_kernel


def _column(z, row_values):
    """A per-row [M] operand as a column [..., 1] beside z's rows."""
    return row_values.reshape(*z.shape[:-1], 1)


def _probs(z, lse):
    return torch.exp(to_acc(z) - _column(z, to_acc(lse)))


def _minus_onehot_(p, z, y):
    return p.scatter_add_(-1, _column(z, y), -torch.ones(*z.shape[:-1], 1, dtype=p.dtype, device=p.device))


def reference_forward(z):
    return torch.logsumexp(to_acc(z), -1).reshape(-1).to(z.dtype)


def reference_backward_(z, lse, y, c):
    return z.copy_(_minus_onehot_(_probs(z, lse), z, y) * _column(z, to_acc(c)))


def reference_double_backward_(z, u, lse, y, c):
    p, ua, ca = _probs(z, lse), to_acc(u), _column(z, to_acc(c))
    pu = (p * ua).sum(-1, keepdim=True)
    u_y = ua.gather(-1, _column(z, y))
    u.copy_(ca * (ua - pu) * p)
    z.copy_(_minus_onehot_(p, z, y) * ca)
    return (pu - u_y).reshape(-1).to(z.dtype)


def forward(z: torch.Tensor) -> torch.Tensor:
    return run_kernel("xent_forward", reference_forward, z.device, z)


def backward_(z, lse, y, c) -> torch.Tensor:
    return run_kernel("xent_backward_", reference_backward_, z.device, z, lse, y, c)


def double_backward_(z, u, lse, y, c) -> torch.Tensor:
    return run_kernel("xent_double_backward_", reference_double_backward_, z.device, z, u, lse, y, c)
