"""Triton kernel of the vocabulary head's cross-entropy rows (same math and contract as
csrc/xent_kernels.h and the ``xent_*`` functions of metakernels._C): one program per row of [M, V],
walking the row in blocks of BLOCK columns, once per pass over it.  On CPU tensors it runs only under
TRITON_INTERPRET=1."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import new_output, tl_acc

_BLOCK = 1024


@triton.jit
def _xent_kernel(z_ptr, u_ptr, lse_ptr, y_ptr, c_ptr, out_ptr, V,
                 PASS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    offs = tl.arange(0, BLOCK)
    if PASS == 0:
        m = tl.zeros([], dtype=ACC) - float("inf")
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(z_ptr + base + cols, mask=cols < V, other=float("-inf")).to(ACC)
            m = tl.maximum(m, tl.max(x, axis=0))
        s = tl.zeros([], dtype=ACC)
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(z_ptr + base + cols, mask=cols < V, other=float("-inf")).to(ACC)
            s += tl.sum(tl.where(cols < V, tl.exp(x - m), 0.0), axis=0)
        finite = (m != float("inf")) & (m != float("-inf"))
        tl.store(out_ptr + row, tl.where(finite, m + tl.log(s), m).to(out_ptr.dtype.element_ty))
    else:
        lse = tl.load(lse_ptr + row).to(ACC)
        c = tl.load(c_ptr + row).to(ACC)
        y = tl.load(y_ptr + row)
        if PASS == 1:
            for start in range(0, V, BLOCK):
                cols = start + offs
                p = tl.exp(tl.load(z_ptr + base + cols, mask=cols < V, other=0.0).to(ACC) - lse)
                delta = c * tl.where(cols == y, p - 1.0, p)
                tl.store(z_ptr + base + cols, delta.to(z_ptr.dtype.element_ty), mask=cols < V)
        else:
            pu = tl.zeros([], dtype=ACC)
            for start in range(0, V, BLOCK):
                cols = start + offs
                p = tl.exp(tl.load(z_ptr + base + cols, mask=cols < V, other=0.0).to(ACC) - lse)
                u = tl.load(u_ptr + base + cols, mask=cols < V, other=0.0).to(ACC)
                pu += tl.sum(tl.where(cols < V, p * u, 0.0), axis=0)
            u_y = tl.load(u_ptr + base + y).to(ACC)
            for start in range(0, V, BLOCK):
                cols = start + offs
                p = tl.exp(tl.load(z_ptr + base + cols, mask=cols < V, other=0.0).to(ACC) - lse)
                u = tl.load(u_ptr + base + cols, mask=cols < V, other=0.0).to(ACC)
                tl.store(u_ptr + base + cols, (c * (u - pu) * p).to(u_ptr.dtype.element_ty), mask=cols < V)
                tl.store(z_ptr + base + cols, (c * tl.where(cols == y, p - 1.0, p)).to(z_ptr.dtype.element_ty),
                         mask=cols < V)
            tl.store(out_ptr + row, (pu - u_y).to(out_ptr.dtype.element_ty))


def _launch(pass_, z, u, lse, y, c, out):
    V = z.shape[-1]
    M = z.numel() // V
    if M == 0:
        return
    _xent_kernel[(M,)](z, u if u is not None else z, lse if lse is not None else z, y if y is not None else z,
                       c if c is not None else z, out if out is not None else z, V,
                       PASS=pass_, ACC=tl_acc(z.dtype), BLOCK=min(_BLOCK, max(16, triton.next_power_of_2(V))))


def xent_forward(z):
    lse = new_output(z, (z.numel() // z.shape[-1],))
    _launch(0, z, None, None, None, None, lse)
    return lse


def xent_backward_(z, lse, y, c):
    _launch(1, z, None, lse, y, c, None)
    return z


def xent_double_backward_(z, u, lse, y, c):
    r = new_output(z, (z.numel() // z.shape[-1],))
    _launch(2, z, u, lse, y, c, r)
    return r
