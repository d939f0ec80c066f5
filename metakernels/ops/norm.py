"""Fused, twice-differentiable, task-batched LayerNorm and RMSNorm.

    layer_norm(x, weight, bias, eps)   # x: [*task, ..., D]; weight, bias: [D] or [*task, D]
    rms_norm(x, weight, eps)

A weight with leading task dimensions ``[*task, D]`` normalises each task's rows with its own weight: that
is how ``torch.vmap`` over per-task fast weights reaches these ops (their vmap rule stacks the tasks and
makes one launch).  Per row of D elements (``centered`` = LayerNorm; RMSNorm has mu = 0 and no bias):

    mu = mean(x),  r = 1 / sqrt(mean((x - mu)^2) + eps),  xh = (x - mu) r,  y = xh w + b

Backward, for the output cotangent g (gh = g w; m1 = mean(gh), m2 = mean(gh xh), per row):

    dx = r (gh - m1 - xh m2),   dw = sum_rows g xh,   db = sum_rows g

Double backward, for cotangents a, aw, ab of (dx, dw, db) (A1 = mean(a), A2 = mean(a xh),
Agh = mean(a gh) per row):

    dg = w r (a - A1 - xh A2) + aw xh + ab
    dw = sum_rows g r (a - A1 - xh A2)
    G  = -r (a m2 + A2 gh) + aw g                 (the cotangent of xh at fixed r)
    dx = r (G - mean(G) - xh mean(G xh)) - r^2 xh (Agh - A1 m1 - A2 m2)

Every quantity is a per-row reduction or a per-element expression, so each of the three is one fused
kernel (a row pass, plus a deterministic chunked sum over rows for the weight cotangents).  The triple
derivative is not implemented: differentiating the double backward raises (``_autograd.twice_differentiable``).
"""
from __future__ import annotations

import torch

from .._autograd import apply, cached_signature, twice_differentiable
from . import _checks
from ._common import to_acc
from ._task_batch import as_tasks, kernel_operands, run_kernel, shaped, task_vmap


# ----------------------------------------------------------------------------------------- reference
# The plain-PyTorch implementations of the three kernels over canonical shapes x [N, R, D], w [N, D],
# per-row statistics [N, R]: the oracle of the compiled backends.

def reference_forward(x, w, b, eps: float, centered: bool):
    xa, wa = to_acc(x), to_acc(w).unsqueeze(1)
    mean = xa.mean(-1) if centered else torch.zeros(xa.shape[:-1], dtype=xa.dtype, device=x.device)
    xc = xa - mean.unsqueeze(-1)
    rstd = torch.rsqrt((xc * xc).mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1) * wa
    if b is not None:
        y = y + to_acc(b).unsqueeze(1)
    return y.to(x.dtype), mean, rstd


def _row_terms(g, x, w, mean, rstd):
    r = rstd.unsqueeze(-1)
    xh = (to_acc(x) - mean.unsqueeze(-1)) * r
    ga = to_acc(g)
    return ga, xh, r, ga * to_acc(w).unsqueeze(1)


def reference_backward(g, x, w, mean, rstd, centered: bool):
    ga, xh, r, gh = _row_terms(g, x, w, mean, rstd)
    m2 = (gh * xh).mean(-1, keepdim=True)
    centre = gh.mean(-1, keepdim=True) if centered else 0.0
    dx = r * (gh - centre - xh * m2)
    dw = (ga * xh).sum(1)
    return dx.to(x.dtype), dw.to(w.dtype), ga.sum(1).to(w.dtype)


def reference_double_backward(a, aw, ab, g, x, w, mean, rstd, centered: bool):
    ga, xh, r, gh = _row_terms(g, x, w, mean, rstd)
    aa, awa = to_acc(a), to_acc(aw).unsqueeze(1)
    m2 = (gh * xh).mean(-1, keepdim=True)
    A2 = (aa * xh).mean(-1, keepdim=True)
    if centered:
        m1, A1 = gh.mean(-1, keepdim=True), aa.mean(-1, keepdim=True)
    else:
        m1 = A1 = torch.zeros_like(m2)
    inner = r * (aa - A1 - xh * A2)
    dg = to_acc(w).unsqueeze(1) * inner + awa * xh
    if ab is not None:
        dg = dg + to_acc(ab).unsqueeze(1)
    dw = (ga * inner).sum(1)
    G = -r * (aa * m2 + A2 * gh) + awa * ga
    GmeanC = G.mean(-1, keepdim=True) if centered else 0.0
    slope = (aa * gh).mean(-1, keepdim=True) - A1 * m1 - A2 * m2
    dx = r * (G - GmeanC - xh * (G * xh).mean(-1, keepdim=True)) - r * r * xh * slope
    return dg.to(g.dtype), dx.to(x.dtype), dw.to(w.dtype)


# ---------------------------------------------------------------------------------- autograd wiring

@cached_signature
class _Norm(torch.autograd.Function):
    """(y, mean, rstd) = norm(x, w, b) for x [*rows, D] with one w, b [D] (b may be None), or x [N, *rows, D]
    with w, b [N, D]; y has x's shape, mean and rstd x's without D (saved for the backward, not
    differentiable)."""

    @staticmethod
    def forward(x, w, b, eps, centered):
        w2, x3 = kernel_operands(w, (x,))
        b2 = None if b is None else b.reshape(w2.shape).contiguous()
        y, mean, rstd = run_kernel("norm_forward", reference_forward, x.device, x3, w2, b2, eps, centered)
        return shaped(y, x.shape), shaped(mean, x.shape[:-1]), shaped(rstd, x.shape[:-1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b, _, centered = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.centered, ctx.has_bias = centered, b is not None
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx, gy, _gmean, _grstd):
        x, w, mean, rstd = ctx.saved_tensors
        dx, dw, db = _NormBackward.apply(gy, x, w, mean, rstd, ctx.centered)
        return dx, dw, db if ctx.has_bias else None, None, None

    @staticmethod
    def vmap(info, in_dims, x, w, b, eps, centered):
        return task_vmap(_Norm.apply, info, in_dims, (x, w, b, eps, centered), 1, 1)


@cached_signature
class _NormBackward(torch.autograd.Function):
    """(dx, dw, db) = the norm's backward at (g, x, w), shaped as (x, w, w): a fused kernel whose own
    backward is the fused double-backward kernel."""

    @staticmethod
    def forward(g, x, w, mean, rstd, centered):
        w2, x3, g3, mean2, rstd2 = kernel_operands(w, (x, g), (mean, rstd))
        dx, dw, db = run_kernel("norm_backward", reference_backward, x.device, g3, x3, w2, mean2, rstd2, centered)
        return shaped(dx, x.shape), shaped(dw, w.shape), shaped(db, w.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, w, mean, rstd, centered = inputs
        ctx.save_for_backward(g, x, w, mean, rstd)
        ctx.centered = centered

    @staticmethod
    @twice_differentiable("layer_norm / rms_norm")
    def backward(ctx, a, aw, ab):
        g, x, w, mean, rstd = ctx.saved_tensors
        w2, x3, g3, mean2, rstd2 = kernel_operands(w, (x, g), (mean, rstd))
        a = torch.zeros_like(x3) if a is None else as_tasks(a, w2.shape[0]).contiguous()
        aw = torch.zeros_like(w2) if aw is None else aw.reshape(w2.shape).contiguous()
        ab = None if ab is None else ab.reshape(w2.shape).contiguous()
        dg, dx, dw = run_kernel("norm_double_backward", reference_double_backward, x.device,
                                a, aw, ab, g3, x3, w2, mean2, rstd2, ctx.centered)
        return shaped(dg, g.shape), shaped(dx, x.shape), shaped(dw, w.shape), None, None, None

    @staticmethod
    def vmap(info, in_dims, g, x, w, mean, rstd, centered):
        return task_vmap(_NormBackward.apply, info, in_dims, (g, x, w, mean, rstd, centered), 2, 1)


# ------------------------------------------------------------------------------------------ public

def _check(op: str, x, weight, bias, eps) -> tuple[int, int]:
    """(N, D): the number of weight rows (tasks) and the normalised size."""
    _checks.require_tensor(op, "x", x)
    _checks.require_tensor(op, "weight", weight)
    _checks.require_like(op, "weight", weight, "x", x)
    if bias is not None:
        _checks.require_tensor(op, "bias", bias)
        _checks.require_like(op, "bias", bias, "x", x)
        if bias.shape != weight.shape:
            raise ValueError(f"{op}: argument 'bias' must have the shape of 'weight', "
                             f"{_checks.shape_str(weight.shape)}, got {_checks.shape_str(bias.shape)}")
    _checks.require_number(op, "eps", eps, low=0.0, low_open=True)
    if weight.dim() < 1 or x.dim() < weight.dim() or x.shape[-1] != weight.shape[-1] \
            or x.shape[:weight.dim() - 1] != weight.shape[:-1]:
        raise ValueError(
            f"{op}: argument 'weight' must be [D] or [*task, D] with x [*task, ..., D] (D = x's last size, "
            f"task sizes leading x's), got weight {_checks.shape_str(weight.shape)} for x {_checks.shape_str(x.shape)}"
        )
    D = weight.shape[-1]
    return weight.numel() // D if D else 0, D


def _norm(op, x, weight, bias, eps, centered):
    N, D = _check(op, x, weight, bias, eps)
    if x.numel() == 0:
        return x.clone()
    if weight.dim() <= 2:
        return apply(_Norm, x, weight, bias, float(eps), centered)[0]
    y, _, _ = apply(_Norm, x.reshape(N, -1, D), weight.reshape(N, D), None if bias is None else bias.reshape(N, D),
                    float(eps), centered)
    return y.reshape(x.shape)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5):
    """LayerNorm over the last dimension with a per-task (or shared) affine; see the module docstring."""
    return _norm("layer_norm", x, weight, bias, eps, True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight."""
    return _norm("rms_norm", x, weight, None, eps, False)
