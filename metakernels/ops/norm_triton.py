"""Triton kernels of the fused LayerNorm / RMSNorm (same math and contract as csrc/norm_math.h and the
``norm_*`` functions of metakernels._C).

Row kernels: one program per row, the whole row in one block of next_pow2(D) lanes.  Weight cotangents:
a column kernel writes per-chunk partial sums ([N, chunks, D], chunks of 32 rows as in the other
backends) and torch sums the chunks (a deterministic reduction).  eps travels as a tensor in the
accumulation dtype (Triton passes Python floats as fp32).  On CPU tensors these kernels run only under
TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, new_output, tl_acc

_ROWS_PER_CHUNK = 32


@triton.jit
def _row_xh(x_row_ptr, mean_ptr, rstd_ptr, row, offs, mask, ACC: tl.constexpr):
    """xh = (x - mean) r of one row (0 outside it), and r."""
    mean = tl.load(mean_ptr + row)
    r = tl.load(rstd_ptr + row)
    x = tl.load(x_row_ptr + offs, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, (x - mean) * r, 0.0), r


@triton.jit
def _norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, eps_ptr, R, D,
                     CENTERED: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // R
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(ACC)
    if CENTERED:
        mean = tl.sum(x, axis=0) / D
    else:
        mean = tl.sum(x * 0.0, axis=0)
    c = tl.where(mask, x - mean, 0.0)
    r = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / D + tl.load(eps_ptr))
    y = c * r * tl.load(w_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        y += tl.load(b_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, r)


@triton.jit
def _norm_bwd_row_kernel(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, R, D,
                         CENTERED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // R
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    xh, r = _row_xh(x_ptr + row * D, mean_ptr, rstd_ptr, row, offs, mask, ACC)
    gh = tl.load(g_ptr + row * D + offs, mask=mask, other=0.0).to(ACC) * \
        tl.load(w_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    m2 = tl.sum(gh * xh, axis=0) / D
    if CENTERED:
        dx = r * (gh - tl.sum(gh, axis=0) / D - xh * m2)
    else:
        dx = r * (gh - xh * m2)
    tl.store(dx_ptr + row * D + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_dbl_row_kernel(a_ptr, aw_ptr, ab_ptr, g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dg_ptr, dx_ptr,
                         stats_ptr, R, D, CENTERED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // R
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    xh, r = _row_xh(x_ptr + row * D, mean_ptr, rstd_ptr, row, offs, mask, ACC)
    g = tl.load(g_ptr + row * D + offs, mask=mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + row * D + offs, mask=mask, other=0.0).to(ACC)
    aw = tl.load(aw_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    ab = tl.load(ab_ptr + n * D + offs, mask=mask, other=0.0).to(ACC)
    gh = g * w
    m2 = tl.sum(gh * xh, axis=0) / D
    A2 = tl.sum(a * xh, axis=0) / D
    if CENTERED:
        m1 = tl.sum(gh, axis=0) / D
        A1 = tl.sum(a, axis=0) / D
    else:
        m1 = m2 * 0.0
        A1 = m2 * 0.0
    slope = tl.sum(a * gh, axis=0) / D - A1 * m1 - A2 * m2
    dgh = r * (a - A1 - xh * A2)
    G = tl.where(mask, -r * (a * m2 + A2 * gh) + aw * g, 0.0)
    if CENTERED:
        mG = tl.sum(G, axis=0) / D
    else:
        mG = m2 * 0.0
    dx = r * (G - mG - xh * (tl.sum(G * xh, axis=0) / D)) - r * r * xh * slope
    tl.store(dg_ptr + row * D + offs, (w * dgh + aw * xh + ab).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + row * D + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + 2 * row, A1)
    tl.store(stats_ptr + 2 * row + 1, A2)


@triton.jit
def _norm_col_kernel(g_ptr, x_ptr, a_ptr, mean_ptr, rstd_ptr, stats_ptr, pw_ptr, pb_ptr, R, D, NCHUNKS,
                     DOUBLE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums over one chunk of rows: backward dw += g xh, db += g; double backward
    dw += g r (a - A1 - xh A2)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    chunk = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    mask = cols < D
    sw = tl.zeros([BLOCK], dtype=ACC)
    sb = tl.zeros([BLOCK], dtype=ACC)
    for k in range(ROWS):
        rr = chunk * ROWS + k
        if rr < R:
            row = n * R + rr
            idx = row * D + cols
            r = tl.load(rstd_ptr + row)
            xh = (tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC) - tl.load(mean_ptr + row)) * r
            g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
            if DOUBLE:
                a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(ACC)
                sw += g * r * (a - tl.load(stats_ptr + 2 * row) - xh * tl.load(stats_ptr + 2 * row + 1))
            else:
                sw += g * xh
                sb += g
    out = (n * NCHUNKS + chunk) * D + cols
    tl.store(pw_ptr + out, sw, mask=mask)
    tl.store(pb_ptr + out, sb, mask=mask)


def _block(D: int) -> int:
    return max(triton.next_power_of_2(D), 16)


def _column_sums(g, x, a, mean, rstd, stats, w, double: bool):
    N, R, D = x.shape
    nchunks = triton.cdiv(R, _ROWS_PER_CHUNK)
    pw = torch.empty((N, nchunks, D), dtype=acc_dtype(x.dtype), device=x.device)
    pb = torch.empty_like(pw)
    block = min(_block(D), 128)
    _norm_col_kernel[(triton.cdiv(D, block), nchunks, N)](
        g, x, a if a is not None else g, mean, rstd, stats if stats is not None else rstd, pw, pb, R, D, nchunks,
        DOUBLE=double, ACC=tl_acc(x.dtype), ROWS=_ROWS_PER_CHUNK, BLOCK=block)
    return pw.sum(1).to(w.dtype), pb.sum(1).to(w.dtype)


def norm_forward(x, w, b, eps, centered):
    N, R, D = x.shape
    y = new_output(x)
    mean = new_output(x, (N, R), acc_dtype(x.dtype))
    rstd = new_output(x, (N, R), acc_dtype(x.dtype))
    eps_t = torch.tensor([eps], dtype=acc_dtype(x.dtype), device=x.device)
    _norm_fwd_kernel[(N * R,)](x, w, b if b is not None else w, y, mean, rstd, eps_t, R, D, CENTERED=centered,
                               HAS_BIAS=b is not None, ACC=tl_acc(x.dtype), BLOCK=_block(D))
    return y, mean, rstd


def norm_backward(g, x, w, mean, rstd, centered):
    N, R, D = x.shape
    dx = new_output(x)
    _norm_bwd_row_kernel[(N * R,)](g, x, w, mean, rstd, dx, R, D, CENTERED=centered, ACC=tl_acc(x.dtype),
                                   BLOCK=_block(D))
    dw, db = _column_sums(g, x, None, mean, rstd, None, w, double=False)
    return dx, dw, db


def norm_double_backward(a, aw, ab, g, x, w, mean, rstd, centered):
    N, R, D = x.shape
    dg, dx = new_output(x), new_output(x)
    stats = torch.empty((N, R, 2), dtype=acc_dtype(x.dtype), device=x.device)
    _norm_dbl_row_kernel[(N * R,)](a, aw, ab if ab is not None else torch.zeros_like(w), g, x, w, mean, rstd, dg, dx,
                                   stats, R, D, CENTERED=centered, ACC=tl_acc(x.dtype), BLOCK=_block(D))
    dw, _ = _column_sums(g, x, a, mean, rstd, stats, w, double=True)
    return dg, dx, dw
