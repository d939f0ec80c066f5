"""Triton kernel of the fused bias + GELU (same math and contract as csrc/gelu_math.h and the
``gelu_*`` functions of metakernels._C): one program per block of elements of [N, R, C], each output
written once.  On CPU tensors it runs only under TRITON_INTERPRET=1."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, new_output, tl_acc

_BLOCK = 1024
# sqrt(2/pi), the tanh form's cubic coefficient, 1/sqrt(2 pi), 1/sqrt(2): loaded in the accumulation dtype
# (Triton rounds Python float literals to fp32, which cost fp64 runs 1e-8 relative).
_CONSTANTS = (math.sqrt(2.0 / math.pi), 0.044715, 1.0 / math.sqrt(2.0 * math.pi), 1.0 / math.sqrt(2.0))


@triton.jit
def _tanh(s):
    e = tl.exp(-2.0 * tl.abs(s))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(s < 0, -t, t)


@triton.jit
def _gelu_kernel(x_ptr, b_ptr, g_ptr, a_ptr, out_ptr, outg_ptr, const_ptr, R, C, total,
                 PASS: tl.constexpr, TANH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    bi = (e // (R * C)) * C + e % C
    u = tl.load(x_ptr + e, mask=mask, other=0.0).to(ACC) + tl.load(b_ptr + bi, mask=mask, other=0.0).to(ACC)
    if TANH:
        c = tl.load(const_ptr + 0)
        k = tl.load(const_ptr + 1)
        t = _tanh(c * (u + k * u * u * u))
        ds = c * (1.0 + 3.0 * k * u * u)
        sech2 = 1.0 - t * t
        value = 0.5 * u * (1.0 + t)
        d1 = 0.5 * (1.0 + t) + 0.5 * u * sech2 * ds
        d2 = sech2 * (ds - u * t * ds * ds + 3.0 * c * k * u * u)
    else:
        phi = tl.load(const_ptr + 2) * tl.exp(-0.5 * u * u)
        Phi = 0.5 * (1.0 + tl.math.erf(u * tl.load(const_ptr + 3)))
        value = u * Phi
        d1 = Phi + u * phi
        d2 = phi * (2.0 - u * u)
    if PASS == 0:
        tl.store(out_ptr + e, value.to(out_ptr.dtype.element_ty), mask=mask)
    elif PASS == 1:
        g = tl.load(g_ptr + e, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + e, (g * d1).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        g = tl.load(g_ptr + e, mask=mask, other=0.0).to(ACC)
        a = tl.load(a_ptr + e, mask=mask, other=0.0).to(ACC)
        tl.store(outg_ptr + e, (a * d1).to(outg_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + e, (a * g * d2).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(pass_, x, b, g, a, out, out_g, tanh_form):
    N, R, C = x.shape
    total = x.numel()
    consts = torch.tensor(_CONSTANTS, dtype=acc_dtype(x.dtype), device=x.device)
    _gelu_kernel[(triton.cdiv(total, _BLOCK),)](
        x, b, g if g is not None else x, a if a is not None else x, out, out_g if out_g is not None else out,
        consts, R, C, total, PASS=pass_, TANH=tanh_form, ACC=tl_acc(x.dtype),
        BLOCK=_BLOCK)


def gelu_forward(x, b, tanh_form):
    y = new_output(x)
    _launch(0, x, b, None, None, y, None, tanh_form)
    return y


def gelu_backward(g, x, b, tanh_form):
    dx = new_output(x)
    _launch(1, x, b, g, None, dx, None, tanh_form)
    return dx


def gelu_double_backward(a, g, x, b, tanh_form):
    dg, du = new_output(x), new_output(x)
    _launch(2, x, b, g, a, du, dg, tanh_form)
    return dg, du
