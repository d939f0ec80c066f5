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


def _probs(z, lse):
    return torch.exp(to_acc(z) - to_acc(lse).reshape(*z.shape[:-1], 1))


def reference_forward(z):
    return torch.logsumexp(to_acc(z), -1).reshape(-1).to(z.dtype)


def reference_backward_(z, lse, y, c):
    p = _probs(z, lse)
    p.scatter_add_(-1, y.reshape(*z.shape[:-1], 1), -torch.ones(*z.shape[:-1], 1, dtype=p.dtype, device=p.device))
    return z.copy_(p * to_acc(c).reshape(*z.shape[:-1], 1))


def reference_double_backward_(z, u, lse, y, c):
    p, ua = _probs(z, lse), to_acc(u)
    rows = (*z.shape[:-1], 1)
    pu = (p * ua).sum(-1, keepdim=True)
    u_y = ua.gather(-1, y.reshape(rows))
    ca = to_acc(c).reshape(rows)
    u.copy_(ca * (ua - pu) * p)
    p.scatter_add_(-1, y.reshape(rows), -torch.ones(rows, dtype=p.dtype, device=p.device))
    z.copy_(ca * p)
    return (pu - u_y).reshape(-1).to(z.dtype)


def forward(z: torch.Tensor) -> torch.Tensor:
    return run_kernel("xent_forward", reference_forward, z.device, z)


def backward_(z, lse, y, c) -> torch.Tensor:
    return run_kernel("xent_backward_", reference_backward_, z.device, z, lse, y, c)


def double_backward_(z, u, lse, y, c) -> torch.Tensor:
    return run_kernel("xent_double_backward_", reference_double_backward_, z.device, z, u, lse, y, c)
