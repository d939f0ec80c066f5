"""Triton kernel of the fused causal softmax (same math and contract as csrc/softmax_kernels.h and the
``softmax_*`` functions of metakernels._C): one program per row of [N, S_q, S_k], the row in one block
of next_pow2(S_k) lanes.  The scale travels as a tensor in the accumulation dtype (Triton rounds Python
floats to fp32).  On CPU tensors it runs only under TRITON_INTERPRET=1."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, new_output, tl_acc


@triton.jit
def _softmax_kernel(s_ptr, p_ptr, g_ptr, a_ptr, out_ptr, out2_ptr, scale_ptr, Sq, Sk,
                    PASS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < Sk
    base = row * Sk
    scale = tl.load(scale_ptr)
    if PASS == 0:
        visible = offs < (row % Sq + Sk - Sq + 1)
        z = tl.load(s_ptr + base + offs, mask=visible, other=0.0).to(ACC) * scale
        z = tl.where(visible, z, float("-inf"))
        e = tl.where(visible, tl.exp(z - tl.max(z, axis=0)), 0.0)
        tl.store(out_ptr + base + offs, (e / tl.sum(e, axis=0)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        c = tl.sum(p * g, axis=0)
        if PASS == 1:
            tl.store(out_ptr + base + offs, (scale * p * (g - c)).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            a = tl.load(a_ptr + base + offs, mask=mask, other=0.0).to(ACC)
            A = tl.sum(p * a, axis=0)
            tl.store(out_ptr + base + offs, (scale * p * (a - A)).to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out2_ptr + base + offs, (scale * (a * (g - c) - A * g)).to(out2_ptr.dtype.element_ty), mask=mask)


def _launch(pass_, ref, s, p, g, a, out, out2, scale):
    N, Sq, Sk = ref.shape
    scale_t = torch.tensor([scale], dtype=acc_dtype(ref.dtype), device=ref.device)
    _softmax_kernel[(N * Sq,)](s if s is not None else ref, p if p is not None else ref, g if g is not None else ref,
                               a if a is not None else ref, out, out2 if out2 is not None else out, scale_t, Sq, Sk,
                               PASS=pass_, ACC=tl_acc(ref.dtype),
                               BLOCK=max(triton.next_power_of_2(Sk), 16))


def softmax_forward(s, scale):
    p = new_output(s)
    _launch(0, s, s, None, None, None, p, None, scale)
    return p


def softmax_backward(g, p, scale):
    ds = new_output(p)
    _launch(1, p, None, p, g, None, ds, None, scale)
    return ds


def softmax_double_backward(a, g, p, scale):
    dg, dp = new_output(p), new_output(p)
    _launch(2, p, None, p, g, a, dg, dp, scale)
    return dg, dp
