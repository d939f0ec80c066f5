"""Triton kernels of the fused learned-optimizer step (same math and contract as csrc/lopt_math.h and
the ``lopt_forward`` / ``lopt_backward`` functions of metakernels._C).

Work is cut into jobs of BLOCK elements that never cross a (task, segment) boundary.  The per-feature
MLP runs as small matrix products (``tl.dot`` in IEEE precision: no TF32) on [BLOCK, features] tiles,
padded to 16 columns.  Reductions are deterministic: per-job partials of the segment sums, reduced in a
fixed tree by :meth:`_Jobs.segment_sums`; the weight gradient is accumulated by a fixed grid of programs,
each owning one row of partials (jobs j = program, program + grid, ...), and the rows are summed in
order.  The backward recomputes the activations of earlier layers instead of storing them (the MLP has
at most 4 hidden layers).  On CPU tensors these kernels run only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, new_output, tl_acc

_BLOCK = 64
_FP = 16  # features padded to the smallest tl.dot size
_OUT_PAD = 16
_BWD_PROGRAMS = 1024
NUM_FEATURES = 9


@triton.jit
def _state_and_r(g, s0, s1, s2, s3, hp_ptr):
    b0 = tl.load(hp_ptr + 0)
    b1 = tl.load(hp_ptr + 1)
    b2 = tl.load(hp_ptr + 2)
    bv = tl.load(hp_ptr + 3)
    m0 = b0 * s0 + (1.0 - b0) * g
    m1 = b1 * s1 + (1.0 - b1) * g
    m2 = b2 * s2 + (1.0 - b2) * g
    v = bv * s3 + (1.0 - bv) * g * g
    r = 1.0 / tl.sqrt(v + tl.load(hp_ptr + 4))
    return m0, m1, m2, v, r


@triton.jit
def _feature_matrix(p, g, m0, m1, m2, r, cols):
    """[BLOCK, FP] raw features (p, g, m0, m1, m2, g r, m0 r, m1 r, m2 r), zero padded."""
    f = tl.where(cols == 0, p[:, None], 0.0)
    f += tl.where(cols == 1, g[:, None], 0.0)
    f += tl.where(cols == 2, m0[:, None], 0.0)
    f += tl.where(cols == 3, m1[:, None], 0.0)
    f += tl.where(cols == 4, m2[:, None], 0.0)
    f += tl.where(cols == 5, (g * r)[:, None], 0.0)
    f += tl.where(cols == 6, (m0 * r)[:, None], 0.0)
    f += tl.where(cols == 7, (m1 * r)[:, None], 0.0)
    f += tl.where(cols == 8, (m2 * r)[:, None], 0.0)
    return f


@triton.jit
def _column(x, cols, k):
    return tl.sum(tl.where(cols == k, x, 0.0), axis=1)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_matrix(w_ptr, off, N_OUT: tl.constexpr, N_IN: tl.constexpr, OUT_PAD: tl.constexpr, IN_PAD: tl.constexpr):
    """W [N_OUT, N_IN] (row-major at w_ptr + off) as a zero-padded [OUT_PAD, IN_PAD] tile."""
    r = tl.arange(0, OUT_PAD)[:, None]
    k = tl.arange(0, IN_PAD)[None, :]
    return tl.load(w_ptr + off + r * N_IN + k, mask=(r < N_OUT) & (k < N_IN), other=0.0)


@triton.jit
def _load_bias(w_ptr, off, N: tl.constexpr, PAD: tl.constexpr):
    i = tl.arange(0, PAD)
    return tl.load(w_ptr + off + i, mask=i < N, other=0.0)


@triton.jit
def _layer_offset(l: tl.constexpr, H: tl.constexpr):
    if l == 0:
        return 0
    return H * 9 + H + (l - 1) * (H * H + H)


@triton.jit
def _relu(z):
    """max(z, 0) with NaN kept NaN (as torch.relu)."""
    return tl.where(z <= 0.0, 0.0, z)


@triton.jit
def _hidden(x, w_ptr, N: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr, IEEE: tl.constexpr):
    """The activation after N >= 1 hidden layers, [BLOCK, HP]."""
    W = _load_matrix(w_ptr, 0, H, 9, HP, FP)
    a = _relu(_dot(x, tl.trans(W), IEEE) + _load_bias(w_ptr, H * 9, H, HP)[None, :])
    for l in tl.static_range(1, N):
        off = _layer_offset(l, H)
        W = _load_matrix(w_ptr, off, H, H, HP, HP)
        a = _relu(_dot(a, tl.trans(W), IEEE) + _load_bias(w_ptr, off + H * H, H, HP)[None, :])
    return a


@triton.jit
def _mlp(x, w_ptr, LAYERS: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, FP: tl.constexpr,
         OUT_PAD: tl.constexpr, IEEE: tl.constexpr):
    """(last hidden activation [BLOCK, HP], padded output matrix W_o [OUT_PAD, HP], d, q)."""
    a = _hidden(x, w_ptr, LAYERS, H, HP, FP, IEEE)
    off = _layer_offset(LAYERS, H)
    Wo = _load_matrix(w_ptr, off, 2, H, OUT_PAD, HP)
    out = _dot(a, tl.trans(Wo), IEEE) + _load_bias(w_ptr, off + 2 * H, 2, OUT_PAD)[None, :]
    ocols = tl.arange(0, OUT_PAD)[None, :]
    return a, Wo, _column(out, ocols, 0), _column(out, ocols, 1)


@triton.jit
def _row9(ptr, t, seg, NSEG, FP: tl.constexpr):
    """The 9 values of (task t, segment seg) in a [T, NSEG, 9] tensor, zero padded to FP."""
    k = tl.arange(0, FP)
    return tl.load(ptr + (t * NSEG + seg) * 9 + k, mask=k < 9, other=0.0)


@triton.jit
def _load_job(job_ptr, jid, off_ptr, P, TP, p_ptr, g_ptr, s_ptr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    t = tl.load(job_ptr + 3 * jid)
    seg = tl.load(job_ptr + 3 * jid + 1)
    begin = tl.load(job_ptr + 3 * jid + 2)
    idx = begin + tl.arange(0, BLOCK)
    mask = idx < tl.load(off_ptr + seg + 1)
    at = t * P + idx
    p = tl.load(p_ptr + at, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + at, mask=mask, other=0.0).to(ACC)
    s0 = tl.load(s_ptr + at, mask=mask, other=0.0).to(ACC)
    s1 = tl.load(s_ptr + TP + at, mask=mask, other=0.0).to(ACC)
    s2 = tl.load(s_ptr + 2 * TP + at, mask=mask, other=0.0).to(ACC)
    s3 = tl.load(s_ptr + 3 * TP + at, mask=mask, other=0.0).to(ACC)
    return t, seg, at, mask, p, g, s0, s1, s2, s3


@triton.jit
def _moments_kernel(job_ptr, off_ptr, p_ptr, g_ptr, s_ptr, hp_ptr, partial_ptr, P, TP,
                    ACC: tl.constexpr, BLOCK: tl.constexpr, FP: tl.constexpr):
    jid = tl.program_id(0).to(tl.int64)
    t, seg, at, mask, p, g, s0, s1, s2, s3 = _load_job(job_ptr, jid, off_ptr, P, TP, p_ptr, g_ptr, s_ptr, BLOCK, ACC)
    m0, m1, m2, v, r = _state_and_r(g, s0, s1, s2, s3, hp_ptr)
    cols = tl.arange(0, FP)[None, :]
    f = tl.where(mask[:, None], _feature_matrix(p, g, m0, m1, m2, r, cols), 0.0)
    k = tl.arange(0, FP)
    tl.store(partial_ptr + jid * 9 + k, tl.sum(f * f, axis=0), mask=k < 9)


@triton.jit
def _step_kernel(job_ptr, off_ptr, p_ptr, g_ptr, s_ptr, w_ptr, norm_ptr, hp_ptr, po_ptr, so_ptr, P, TP, NSEG,
                 H: tl.constexpr, HP: tl.constexpr, LAYERS: tl.constexpr, IEEE: tl.constexpr,
                 ACC: tl.constexpr, BLOCK: tl.constexpr, FP: tl.constexpr, OUT_PAD: tl.constexpr):
    jid = tl.program_id(0).to(tl.int64)
    t, seg, at, mask, p, g, s0, s1, s2, s3 = _load_job(job_ptr, jid, off_ptr, P, TP, p_ptr, g_ptr, s_ptr, BLOCK, ACC)
    m0, m1, m2, v, r = _state_and_r(g, s0, s1, s2, s3, hp_ptr)
    x = _feature_matrix(p, g, m0, m1, m2, r, tl.arange(0, FP)[None, :]) * _row9(norm_ptr, t, seg, NSEG, FP)[None, :]
    a, Wo, d, q = _mlp(x, w_ptr, LAYERS, H, HP, FP, OUT_PAD, IEEE)
    p_new = p - tl.load(hp_ptr + 6) * d * tl.exp(tl.load(hp_ptr + 7) * q)
    tl.store(po_ptr + at, p_new.to(po_ptr.dtype.element_ty), mask=mask)
    tl.store(so_ptr + at, m0.to(so_ptr.dtype.element_ty), mask=mask)
    tl.store(so_ptr + TP + at, m1.to(so_ptr.dtype.element_ty), mask=mask)
    tl.store(so_ptr + 2 * TP + at, m2.to(so_ptr.dtype.element_ty), mask=mask)
    tl.store(so_ptr + 3 * TP + at, v.to(so_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate(ptr, off, grad, N_OUT: tl.constexpr, N_IN: tl.constexpr, OUT_PAD: tl.constexpr, IN_PAD: tl.constexpr):
    """Adds grad [OUT_PAD, IN_PAD] (the padded gradient of W [N_OUT, N_IN]) to the row at ptr + off."""
    r = tl.arange(0, OUT_PAD)[:, None]
    k = tl.arange(0, IN_PAD)[None, :]
    mask = (r < N_OUT) & (k < N_IN)
    dst = ptr + off + r * N_IN + k
    tl.store(dst, tl.load(dst, mask=mask, other=0.0) + grad.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_bias(ptr, off, grad, N: tl.constexpr, PAD: tl.constexpr):
    i = tl.arange(0, PAD)
    dst = ptr + off + i
    tl.store(dst, tl.load(dst, mask=i < N, other=0.0) + grad.to(ptr.dtype.element_ty), mask=i < N)


@triton.jit
def _features_backward(g, m0, m1, m2, r, df, cols, ds_new0, ds_new1, ds_new2, ds_new3, hp_ptr):
    """(dp, dg, ds0..ds3) from df [BLOCK, FP] and the cotangents of the new state."""
    b0 = tl.load(hp_ptr + 0)
    b1 = tl.load(hp_ptr + 1)
    b2 = tl.load(hp_ptr + 2)
    bv = tl.load(hp_ptr + 3)
    df5 = _column(df, cols, 5)
    df6 = _column(df, cols, 6)
    df7 = _column(df, cols, 7)
    df8 = _column(df, cols, 8)
    dm0 = ds_new0 + _column(df, cols, 2) + df6 * r
    dm1 = ds_new1 + _column(df, cols, 3) + df7 * r
    dm2 = ds_new2 + _column(df, cols, 4) + df8 * r
    dr = df5 * g + df6 * m0 + df7 * m1 + df8 * m2
    dv = ds_new3 - 0.5 * dr * r * r * r
    dg = (_column(df, cols, 1) + df5 * r + dm0 * (1.0 - b0) + dm1 * (1.0 - b1) + dm2 * (1.0 - b2)
          + dv * (1.0 - bv) * 2.0 * g)
    return _column(df, cols, 0), dg, dm0 * b0, dm1 * b1, dm2 * b2, dv * bv


@triton.jit
def _store_grads(dp_ptr, dg_ptr, ds_ptr, at, mask, TP, dp, dg, ds0, ds1, ds2, ds3, ADD: tl.constexpr,
                 HAS_DP: tl.constexpr, HAS_DG: tl.constexpr, HAS_DS: tl.constexpr):
    if HAS_DP:
        if ADD:
            dp += tl.load(dp_ptr + at, mask=mask, other=0.0).to(dp.dtype)
        tl.store(dp_ptr + at, dp.to(dp_ptr.dtype.element_ty), mask=mask)
    if HAS_DG:
        if ADD:
            dg += tl.load(dg_ptr + at, mask=mask, other=0.0).to(dg.dtype)
        tl.store(dg_ptr + at, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    if HAS_DS:
        if ADD:
            ds0 += tl.load(ds_ptr + at, mask=mask, other=0.0).to(ds0.dtype)
            ds1 += tl.load(ds_ptr + TP + at, mask=mask, other=0.0).to(ds1.dtype)
            ds2 += tl.load(ds_ptr + 2 * TP + at, mask=mask, other=0.0).to(ds2.dtype)
            ds3 += tl.load(ds_ptr + 3 * TP + at, mask=mask, other=0.0).to(ds3.dtype)
        tl.store(ds_ptr + at, ds0.to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(ds_ptr + TP + at, ds1.to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(ds_ptr + 2 * TP + at, ds2.to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(ds_ptr + 3 * TP + at, ds3.to(ds_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(job_ptr, off_ptr, p_ptr, g_ptr, s_ptr, w_ptr, norm_ptr, hp_ptr, gp_ptr, gs_ptr,
                     dp_ptr, dg_ptr, ds_ptr, dw_ptr, c_ptr, NJOBS, P, TP, NSEG,
                     H: tl.constexpr, HP: tl.constexpr, LAYERS: tl.constexpr, IEEE: tl.constexpr,
                     HAS_GP: tl.constexpr, HAS_GS: tl.constexpr, HAS_DP: tl.constexpr, HAS_DG: tl.constexpr,
                     HAS_DS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, FP: tl.constexpr,
                     OUT_PAD: tl.constexpr, NW: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    dw_row = dw_ptr + pid * NW
    cols = tl.arange(0, FP)[None, :]
    ocols = tl.arange(0, OUT_PAD)[None, :]
    k = tl.arange(0, FP)
    out_off = _layer_offset(LAYERS, H)
    for jid in range(pid, NJOBS, tl.num_programs(0)):
        t, seg, at, mask, p, g, s0, s1, s2, s3 = _load_job(job_ptr, jid, off_ptr, P, TP, p_ptr, g_ptr, s_ptr, BLOCK, ACC)
        m0, m1, m2, v, r = _state_and_r(g, s0, s1, s2, s3, hp_ptr)
        n = _row9(norm_ptr, t, seg, NSEG, FP)
        f = _feature_matrix(p, g, m0, m1, m2, r, cols)
        x = f * n[None, :]
        a, Wo, d, q = _mlp(x, w_ptr, LAYERS, H, HP, FP, OUT_PAD, IEEE)
        gp = tl.zeros([BLOCK], dtype=ACC)
        if HAS_GP:
            gp = tl.load(gp_ptr + at, mask=mask, other=0.0).to(ACC)
        dstep = -gp * tl.load(hp_ptr + 6) * tl.exp(tl.load(hp_ptr + 7) * q)
        dout = tl.where(ocols == 0, dstep[:, None], 0.0) + tl.where(ocols == 1, (dstep * d * tl.load(hp_ptr + 7))[:, None], 0.0)
        _accumulate(dw_row, out_off, _dot(tl.trans(dout), a, IEEE), 2, H, OUT_PAD, HP)
        _accumulate_bias(dw_row, out_off + 2 * H, tl.sum(dout, axis=0), 2, OUT_PAD)
        dz = tl.where(a > 0.0, _dot(dout, Wo, IEEE), 0.0)
        for layer in tl.static_range(LAYERS - 1, 0, -1):
            a_in = _hidden(x, w_ptr, layer, H, HP, FP, IEEE)
            off = _layer_offset(layer, H)
            _accumulate(dw_row, off, _dot(tl.trans(dz), a_in, IEEE), H, H, HP, HP)
            _accumulate_bias(dw_row, off + H * H, tl.sum(dz, axis=0), H, HP)
            dz = tl.where(a_in > 0.0, _dot(dz, _load_matrix(w_ptr, off, H, H, HP, HP), IEEE), 0.0)
        _accumulate(dw_row, 0, _dot(tl.trans(dz), x, IEEE), H, 9, HP, FP)
        _accumulate_bias(dw_row, H * 9, tl.sum(dz, axis=0), H, HP)
        dx = _dot(dz, _load_matrix(w_ptr, 0, H, 9, HP, FP), IEEE)
        tl.store(c_ptr + jid * 9 + k, tl.sum(dx * f, axis=0), mask=k < 9)
        zero = tl.zeros([BLOCK], dtype=ACC)
        gs0 = zero
        gs1 = zero
        gs2 = zero
        gs3 = zero
        if HAS_GS:
            gs0 = tl.load(gs_ptr + at, mask=mask, other=0.0).to(ACC)
            gs1 = tl.load(gs_ptr + TP + at, mask=mask, other=0.0).to(ACC)
            gs2 = tl.load(gs_ptr + 2 * TP + at, mask=mask, other=0.0).to(ACC)
            gs3 = tl.load(gs_ptr + 3 * TP + at, mask=mask, other=0.0).to(ACC)
        dp, dg, ds0, ds1, ds2, ds3 = _features_backward(g, m0, m1, m2, r, dx * n[None, :], cols, gs0, gs1, gs2, gs3, hp_ptr)
        _store_grads(dp_ptr, dg_ptr, ds_ptr, at, mask, TP, dp + gp, dg, ds0, ds1, ds2, ds3, False, HAS_DP, HAS_DG, HAS_DS)


@triton.jit
def _normaliser_kernel(job_ptr, off_ptr, p_ptr, g_ptr, s_ptr, coef_ptr, hp_ptr, dp_ptr, dg_ptr, ds_ptr, P, TP, NSEG,
                       HAS_DP: tl.constexpr, HAS_DG: tl.constexpr, HAS_DS: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr, FP: tl.constexpr):
    jid = tl.program_id(0).to(tl.int64)
    t, seg, at, mask, p, g, s0, s1, s2, s3 = _load_job(job_ptr, jid, off_ptr, P, TP, p_ptr, g_ptr, s_ptr, BLOCK, ACC)
    m0, m1, m2, v, r = _state_and_r(g, s0, s1, s2, s3, hp_ptr)
    cols = tl.arange(0, FP)[None, :]
    df = _feature_matrix(p, g, m0, m1, m2, r, cols) * _row9(coef_ptr, t, seg, NSEG, FP)[None, :]
    zero = tl.zeros([BLOCK], dtype=ACC)
    dp, dg, ds0, ds1, ds2, ds3 = _features_backward(g, m0, m1, m2, r, df, cols, zero, zero, zero, zero, hp_ptr)
    _store_grads(dp_ptr, dg_ptr, ds_ptr, at, mask, TP, dp, dg, ds0, ds1, ds2, ds3, True, HAS_DP, HAS_DG, HAS_DS)


# ------------------------------------------------------------------------------------------ host side

class _Jobs:
    """The job table (t, seg, begin), the segment boundaries and sizes, and the gather plan of
    :meth:`segment_sums`, on the operands' device.

    Built with tensor ops, not a Python loop over jobs, and kept for the shapes last seen (:func:`_jobs`).
    NOTE: that loop, run on every call, took 58-65 ms at T = 1, P = 1e7 on a Zen 4 host (6-13 ms for this
    construction); the Triton step took 58.5 ms in all at that size on an H200 machine."""

    _FAN_IN = 32  # partials summed per group at each level of segment_sums

    def __init__(self, T: int, offsets: tuple[int, ...], device):
        nseg = len(offsets) - 1
        bounds = torch.tensor(offsets, dtype=torch.int64)
        starts, sizes = bounds[:-1], bounds[1:] - bounds[:-1]
        counts = ((sizes + _BLOCK - 1) // _BLOCK).repeat(T)  # jobs of each (task, segment)
        first = _exclusive_cumsum(counts)
        self.count = int(counts.sum())
        ts = torch.repeat_interleave(torch.arange(T * nseg), counts)
        seg = ts % nseg
        begin = starts[seg] + _BLOCK * (torch.arange(self.count) - first[ts])
        self.table = torch.stack([ts // nseg, seg, begin], dim=1).to(device)
        self.offsets = bounds.to(device)
        self.sizes = sizes.repeat(T).to(device=device, dtype=torch.float64)
        self.levels = [level.to(device) for level in _sum_levels(counts, self._FAN_IN)]

    def segment_sums(self, partial: torch.Tensor) -> torch.Tensor:
        """[T * nseg, F] float64: the per-job partials of each (task, segment) summed by a fixed tree
        (groups of _FAN_IN consecutive partials, level by level): deterministic, and never more than one
        level's rows plus _FAN_IN per segment in memory."""
        sums = partial.double()
        for level in self.levels:
            padded = torch.cat([sums, sums.new_zeros(1, sums.shape[1])])
            sums = padded[level].sum(dim=1)
        return sums


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1), x.cumsum(0)[:-1]])


def _sum_levels(counts: torch.Tensor, fan_in: int) -> list[torch.Tensor]:
    """Gather indices [groups, fan_in] of each level of segment_sums: rows are consecutive within one
    segment; the index one past the last row names the zero row that pads a segment's last group."""
    levels = []
    while int(counts.max()) > 1:
        groups = (counts + fan_in - 1) // fan_in
        seg = torch.repeat_interleave(torch.arange(len(counts)), groups)
        group_in_seg = torch.arange(int(groups.sum())) - _exclusive_cumsum(groups)[seg]
        within = fan_in * group_in_seg[:, None] + torch.arange(fan_in)
        rows = _exclusive_cumsum(counts)[seg, None] + within
        levels.append(torch.where(within < counts[seg, None], rows, int(counts.sum())))
        counts = groups
    return levels


@functools.lru_cache(maxsize=8)
def _jobs(T: int, offsets: tuple[int, ...], device: torch.device) -> _Jobs:
    return _Jobs(T, offsets, device)


def _common(param, hyper):
    acc = acc_dtype(param.dtype)
    return acc, tl_acc(param.dtype), torch.tensor(hyper, dtype=acc, device=param.device)


def _hp(H: int) -> int:
    return max(16, triton.next_power_of_2(H))


def lopt_forward(param, grad, state, weights, offsets, hidden, layers, hyper, in_place=False):
    """Same contract as metakernels._C.lopt_forward: returns (params', state', norms); in_place writes
    params' and state' over param and state (each program reads its elements before it writes them)."""
    T, P = param.shape
    acc, acc_tl, hp = _common(param, hyper)
    jobs = _jobs(T, tuple(offsets), param.device)
    nseg = len(offsets) - 1
    p_new, s_new = (param, state) if in_place else (new_output(param, param.shape), new_output(state, state.shape))
    partial = torch.empty(jobs.count, NUM_FEATURES, dtype=acc, device=param.device)
    _moments_kernel[(jobs.count,)](jobs.table, jobs.offsets, param, grad, state, hp, partial, P, T * P,
                                   ACC=acc_tl, BLOCK=_BLOCK, FP=_FP)
    sums = jobs.segment_sums(partial)
    norms = torch.rsqrt(sums / jobs.sizes[:, None] + hyper[5]).to(acc).reshape(T, nseg, NUM_FEATURES).contiguous()
    _step_kernel[(jobs.count,)](jobs.table, jobs.offsets, param, grad, state, weights, norms, hp, p_new, s_new,
                                P, T * P, nseg, H=hidden, HP=_hp(hidden), LAYERS=layers, IEEE=acc == torch.float32,
                                ACC=acc_tl, BLOCK=_BLOCK, FP=_FP, OUT_PAD=_OUT_PAD)
    return p_new, s_new, norms


def lopt_backward(param, grad, state, weights, norms, offsets, hidden, layers, hyper, grad_param_out,
                  grad_state_out, needs_grad):
    """Same contract as metakernels._C.lopt_backward: returns [d_params, d_grads, d_state, d_weights]."""
    T, P = param.shape
    acc, acc_tl, hp = _common(param, hyper)
    jobs = _jobs(T, tuple(offsets), param.device)
    nseg = len(offsets) - 1
    outs = [new_output(like, like.shape) if need else None for like, need in zip((param, grad, state), needs_grad)]
    dp, dg, ds = outs
    programs = max(1, min(jobs.count, _BWD_PROGRAMS))
    dw_partial = torch.zeros(programs, weights.numel(), dtype=acc, device=param.device)
    c_partial = torch.empty(jobs.count, NUM_FEATURES, dtype=acc, device=param.device)
    _backward_kernel[(programs,)](
        jobs.table, jobs.offsets, param, grad, state, weights, norms, hp, grad_param_out, grad_state_out,
        dp, dg, ds, dw_partial, c_partial, jobs.count, P, T * P, nseg,
        H=hidden, HP=_hp(hidden), LAYERS=layers, IEEE=acc == torch.float32,
        HAS_GP=grad_param_out is not None, HAS_GS=grad_state_out is not None,
        HAS_DP=dp is not None, HAS_DG=dg is not None, HAS_DS=ds is not None,
        ACC=acc_tl, BLOCK=_BLOCK, FP=_FP, OUT_PAD=_OUT_PAD, NW=weights.numel())
    d_weights = dw_partial.double().sum(dim=0).to(acc)
    if any(o is not None for o in outs):
        n = norms.reshape(T * nseg, NUM_FEATURES).double()
        coef = (-n ** 3 * jobs.segment_sums(c_partial) / jobs.sizes[:, None]).to(acc).contiguous()
        _normaliser_kernel[(jobs.count,)](
            jobs.table, jobs.offsets, param, grad, state, coef, hp, dp, dg, ds, P, T * P, nseg,
            HAS_DP=dp is not None, HAS_DG=dg is not None, HAS_DS=ds is not None,
            ACC=acc_tl, BLOCK=_BLOCK, FP=_FP)
    return [dp, dg, ds, d_weights]
