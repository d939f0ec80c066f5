"""Triton kernels of the fused update ops (same math and contract as csrc/update_math.h and the
``update_forward`` / ``update_backward`` functions of metakernels._C).

Forward: a 2-D grid (parameter blocks x tasks); each element read once, each output written once.
Backward: one program per parameter block, looping over tasks t = 0..T-1 in order; per-task cotangents
are stored row by row and those of [P] (task-shared) inputs are summed in float64 registers in that
order (as in csrc/update_kernels.h, whose note says why), so the reduction over tasks is deterministic
without atomics.

Hyper-parameters travel as a small tensor in the accumulation dtype (Triton passes Python floats as
fp32, which would round fp64 runs).  On CPU tensors these kernels run only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, new_output, tl_acc

_FWD_BLOCK = 1024
_BWD_BLOCK = 512
_MODE_NONE, _MODE_PER_TASK, _MODE_SUM = 0, 1, 2


@triton.jit
def _load_row(ptr, t, row_stride, offs, mask, ACC: tl.constexpr):
    return tl.load(ptr + t * row_stride + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _adam_moments(g, m, v, beta1, beta2):
    return beta1 * m + (1.0 - beta1) * g, beta2 * v + (1.0 - beta2) * g * g


@triton.jit
def _update_fwd_kernel(p_ptr, g_ptr, s0_ptr, s1_ptr, lr_ptr, po_ptr, s0o_ptr, s1o_ptr, hp_ptr,
                       P, p_rs, g_rs, s0_rs, s1_rs, lr_rs,
                       KIND: tl.constexpr, LR_TENSOR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    t = tl.program_id(1).to(tl.int64)
    out = t * P + offs
    p = _load_row(p_ptr, t, p_rs, offs, mask, ACC)
    g = _load_row(g_ptr, t, g_rs, offs, mask, ACC)
    if LR_TENSOR:
        lr = _load_row(lr_ptr, t, lr_rs, offs, mask, ACC)
    else:
        lr = tl.load(hp_ptr + 0)
    if KIND == 0:
        p_new = p - lr * g
    elif KIND == 1:
        b_new = tl.load(hp_ptr + 1) * _load_row(s0_ptr, t, s0_rs, offs, mask, ACC) + g
        tl.store(s0o_ptr + out, b_new.to(s0o_ptr.dtype.element_ty), mask=mask)
        p_new = p - lr * b_new
    else:
        m_new, v_new = _adam_moments(g, _load_row(s0_ptr, t, s0_rs, offs, mask, ACC),
                                     _load_row(s1_ptr, t, s1_rs, offs, mask, ACC),
                                     tl.load(hp_ptr + 2), tl.load(hp_ptr + 3))
        tl.store(s0o_ptr + out, m_new.to(s0o_ptr.dtype.element_ty), mask=mask)
        tl.store(s1o_ptr + out, v_new.to(s1o_ptr.dtype.element_ty), mask=mask)
        denom = tl.sqrt(v_new / tl.load(hp_ptr + 6)) + tl.load(hp_ptr + 4)
        p_new = p - lr * (m_new / tl.load(hp_ptr + 5)) / denom
    tl.store(po_ptr + out, p_new.to(po_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _emit(ptr, out, value, mask, total, MODE: tl.constexpr):
    if MODE == 1:
        tl.store(ptr + out, value.to(ptr.dtype.element_ty), mask=mask)
    if MODE == 2:
        total += value.to(tl.float64)
    return total


@triton.jit
def _store_sum(ptr, offs, total, mask, ACC: tl.constexpr, MODE: tl.constexpr):
    """The float64 sum over tasks rounded to the accumulation type, then stored (as the C++ kernels do)."""
    if MODE == 2:
        tl.store(ptr + offs, total.to(ACC).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_bwd_kernel(g_ptr, s0_ptr, s1_ptr, lr_ptr, gp_ptr, gs0_ptr, gs1_ptr,
                       dp_ptr, dg_ptr, ds0_ptr, ds1_ptr, dlr_ptr, hp_ptr,
                       T, P, g_rs, s0_rs, s1_rs, lr_rs,
                       KIND: tl.constexpr, LR_TENSOR: tl.constexpr, HAS_GP: tl.constexpr,
                       HAS_GS0: tl.constexpr, HAS_GS1: tl.constexpr,
                       DP_MODE: tl.constexpr, DG_MODE: tl.constexpr, DS0_MODE: tl.constexpr,
                       DS1_MODE: tl.constexpr, DLR_MODE: tl.constexpr,
                       ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    zero = tl.zeros([BLOCK], dtype=ACC)
    sum_p = tl.zeros([BLOCK], dtype=tl.float64)
    sum_g = sum_p
    sum_s0 = sum_p
    sum_s1 = sum_p
    sum_lr = sum_p
    for t32 in range(0, T):
        t = tl.cast(t32, tl.int64)
        out = t * P + offs
        g = _load_row(g_ptr, t, g_rs, offs, mask, ACC)
        if LR_TENSOR:
            lr = _load_row(lr_ptr, t, lr_rs, offs, mask, ACC)
        else:
            lr = tl.load(hp_ptr + 0)
        gp = zero
        if HAS_GP:
            gp = _load_row(gp_ptr, t, P, offs, mask, ACC)
        gs0 = zero
        if HAS_GS0:
            gs0 = _load_row(gs0_ptr, t, P, offs, mask, ACC)
        gs1 = zero
        if HAS_GS1:
            gs1 = _load_row(gs1_ptr, t, P, offs, mask, ACC)
        ds0 = zero
        ds1 = zero
        if KIND == 0:
            dg = -lr * gp
            dlr = -g * gp
        elif KIND == 1:
            momentum = tl.load(hp_ptr + 1)
            b = _load_row(s0_ptr, t, s0_rs, offs, mask, ACC)
            db_total = gs0 - lr * gp
            dg = db_total
            ds0 = momentum * db_total
            dlr = -(momentum * b + g) * gp
        else:
            beta1 = tl.load(hp_ptr + 2)
            beta2 = tl.load(hp_ptr + 3)
            c1 = tl.load(hp_ptr + 5)
            c2 = tl.load(hp_ptr + 6)
            m_new, v_new = _adam_moments(g, _load_row(s0_ptr, t, s0_rs, offs, mask, ACC),
                                         _load_row(s1_ptr, t, s1_rs, offs, mask, ACC), beta1, beta2)
            d = tl.sqrt(v_new / c2) + tl.load(hp_ptr + 4)
            m_hat = m_new / c1
            du = -lr * gp
            positive = v_new > 0.0
            r = tl.where(positive, 0.5 / tl.sqrt(tl.where(positive, v_new * c2, 1.0)), 0.0)
            dm_total = gs0 + du / (c1 * d)
            dv_total = gs1 - du * m_hat / (d * d) * r
            dg = (1.0 - beta1) * dm_total + 2.0 * (1.0 - beta2) * g * dv_total
            ds0 = beta1 * dm_total
            ds1 = beta2 * dv_total
            dlr = -(m_hat / d) * gp
        sum_p = _emit(dp_ptr, out, gp, mask, sum_p, DP_MODE)
        sum_g = _emit(dg_ptr, out, dg, mask, sum_g, DG_MODE)
        sum_s0 = _emit(ds0_ptr, out, ds0, mask, sum_s0, DS0_MODE)
        sum_s1 = _emit(ds1_ptr, out, ds1, mask, sum_s1, DS1_MODE)
        sum_lr = _emit(dlr_ptr, out, dlr, mask, sum_lr, DLR_MODE)
    _store_sum(dp_ptr, offs, sum_p, mask, ACC, DP_MODE)
    _store_sum(dg_ptr, offs, sum_g, mask, ACC, DG_MODE)
    _store_sum(ds0_ptr, offs, sum_s0, mask, ACC, DS0_MODE)
    _store_sum(ds1_ptr, offs, sum_s1, mask, ACC, DS1_MODE)
    _store_sum(dlr_ptr, offs, sum_lr, mask, ACC, DLR_MODE)


def _hyper_tensor(hyper, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(hyper, dtype=acc_dtype(like.dtype), device=like.device)


def _row_stride(t: torch.Tensor | None, P: int) -> int:
    return P if t is not None and t.dim() == 2 else 0


def update_forward(kind: int, param, grad, states, lr, hyper):
    """Same contract as metakernels._C.update_forward: returns [params', *new states]."""
    P = param.shape[-1]
    batched = [t for t in (param, grad, *states, lr) if t is not None and t.dim() == 2]
    T = batched[0].shape[0] if batched else None
    shape = (T, P) if T is not None else (P,)
    outs = [new_output(param, shape) for _ in range(1 + len(states))]
    s = list(states) + [None] * (2 - len(states))
    so = outs[1:] + [None] * (3 - len(outs))
    grid = (triton.cdiv(P, _FWD_BLOCK), T or 1)
    _update_fwd_kernel[grid](
        param, grad, s[0], s[1], lr, outs[0], so[0], so[1], _hyper_tensor(hyper, param),
        P, _row_stride(param, P), _row_stride(grad, P), _row_stride(s[0], P), _row_stride(s[1], P),
        _row_stride(lr, P),
        KIND=kind, LR_TENSOR=lr is not None, ACC=tl_acc(param.dtype), BLOCK=_FWD_BLOCK,
    )
    return outs


def update_backward(kind: int, T: int, param_batched: bool, grad, states, lr, grad_param_out, grad_state_out,
                    needs_grad, hyper):
    """Same contract as metakernels._C.update_backward: returns [d_params or None, d_grads, d_state0,
    d_state1, d_lr], each None when not requested (d_params also when params was [T, P])."""
    P = grad.shape[-1]
    s = list(states) + [None] * (2 - len(states))
    gs = list(grad_state_out) + [None] * (2 - len(grad_state_out))

    def cotangent(needed, source):
        if not needed or source is None:
            return None, _MODE_NONE
        if source.dim() == 2:
            return new_output(grad, (T, P)), _MODE_PER_TASK
        return new_output(grad, (P,)), _MODE_SUM

    shared_param = needs_grad[0] and not param_batched
    dp, dp_mode = (new_output(grad, (P,)), _MODE_SUM) if shared_param else (None, _MODE_NONE)
    dg, dg_mode = cotangent(needs_grad[1], grad)
    ds0, ds0_mode = cotangent(needs_grad[2], s[0])
    ds1, ds1_mode = cotangent(needs_grad[3], s[1])
    dlr, dlr_mode = cotangent(needs_grad[4], lr)
    _update_bwd_kernel[(triton.cdiv(P, _BWD_BLOCK),)](
        grad, s[0], s[1], lr, grad_param_out, gs[0], gs[1], dp, dg, ds0, ds1, dlr, _hyper_tensor(hyper, grad),
        T, P, _row_stride(grad, P), _row_stride(s[0], P), _row_stride(s[1], P), _row_stride(lr, P),
        KIND=kind, LR_TENSOR=lr is not None, HAS_GP=grad_param_out is not None,
        HAS_GS0=gs[0] is not None, HAS_GS1=gs[1] is not None,
        DP_MODE=dp_mode, DG_MODE=dg_mode, DS0_MODE=ds0_mode, DS1_MODE=ds1_mode, DLR_MODE=dlr_mode,
        ACC=tl_acc(grad.dtype), BLOCK=_BWD_BLOCK,
    )
    return [dp, dg, ds0, ds1, dlr]
