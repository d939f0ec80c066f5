"""Fused, twice-differentiable, task-batched bias + GELU: the MLP's element-wise chain.

    bias_gelu(x, bias, approximate="none")   # x: [*task, ..., C]; bias: [C] or [*task, C] (or None)

y = gelu(x + b), with GELU in its exact (erf) or "tanh" form, as ``torch.nn.functional.gelu``.  A bias
with leading task dimensions adds each task's own bias (how ``torch.vmap`` over per-task fast weights
reaches the op: its vmap rule stacks the tasks into one launch).  With u = x + b:

    backward:         dx = g gelu'(u),            db = sum_rows dx
    double backward:  for the cotangent a of dx (db's reaches dx through the sum):
                      dg = a gelu'(u),  dx = a g gelu''(u),  db = sum_rows dx

(gelu' and gelu'' in csrc/gelu_math.h).  Each is one element-wise kernel; the bias cotangents are
torch's deterministic sums over rows.  Differentiating the double backward raises (_autograd.twice_differentiable).
"""
from __future__ import annotations

import math

import torch

from .._autograd import apply, cached_signature, twice_differentiable
from . import _checks
from ._common import acc_dtype, to_acc
from ._task_batch import kernel_operands, row_sum, run_kernel, shaped, task_vmap

APPROXIMATIONS = ("none", "tanh")


# ----------------------------------------------------------------------------------------- reference

def _gelu_values(u: torch.Tensor, tanh_form: bool):
    """gelu(u), gelu'(u), gelu''(u)."""
    if tanh_form:
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        t = torch.tanh(c * (u + k * u ** 3))
        ds = c * (1.0 + 3.0 * k * u * u)
        sech2 = 1.0 - t * t
        return 0.5 * u * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * u * sech2 * ds, sech2 * (ds - u * t * ds * ds + 3.0 * c * k * u * u)
    phi = torch.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    Phi = 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))
    return u * Phi, Phi + u * phi, phi * (2.0 - u * u)


def _u(x, b):
    return to_acc(x) + b.to(acc_dtype(x.dtype)).unsqueeze(1)


def reference_forward(x, b, tanh_form: bool):
    return _gelu_values(_u(x, b), tanh_form)[0].to(x.dtype)


def reference_backward(g, x, b, tanh_form: bool):
    return (g.to(acc_dtype(x.dtype)) * _gelu_values(_u(x, b), tanh_form)[1]).to(x.dtype)


def reference_double_backward(a, g, x, b, tanh_form: bool):
    u = _u(x, b)
    _, d1, d2 = _gelu_values(u, tanh_form)
    a = a.to(u.dtype)
    return (a * d1).to(x.dtype), (a * g.to(u.dtype) * d2).to(x.dtype)


# ---------------------------------------------------------------------------------- autograd wiring

@cached_signature
class _BiasGelu(torch.autograd.Function):
    """y = gelu(x + b) for x [*rows, C] with one b [C], or x [N, *rows, C] with b [N, C]; y has x's shape."""

    @staticmethod
    def forward(x, b, tanh_form):
        b2, x3 = kernel_operands(b, (x,))
        return shaped(run_kernel("gelu_forward", reference_forward, x.device, x3, b2, tanh_form), x.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, b, tanh_form = inputs
        ctx.save_for_backward(x, b)
        ctx.tanh_form = tanh_form

    @staticmethod
    def backward(ctx, gy):
        x, b = ctx.saved_tensors
        dx = _BiasGeluBackward.apply(gy, x, b, ctx.tanh_form)
        return dx, row_sum(dx, b.dim() == 2), None

    @staticmethod
    def vmap(info, in_dims, x, b, tanh_form):
        (y,), (dim,) = task_vmap(lambda *a: (_BiasGelu.apply(*a),), info, in_dims, (x, b, tanh_form), 1, 1)
        return y, dim


@cached_signature
class _BiasGeluBackward(torch.autograd.Function):
    """dx = g gelu'(x + b), shaped as x: a fused kernel whose own backward is the fused double-backward
    kernel."""

    @staticmethod
    def forward(g, x, b, tanh_form):
        b2, x3, g3 = kernel_operands(b, (x, g))
        return shaped(run_kernel("gelu_backward", reference_backward, x.device, g3, x3, b2, tanh_form), x.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, b, tanh_form = inputs
        ctx.save_for_backward(g, x, b)
        ctx.tanh_form = tanh_form

    @staticmethod
    @twice_differentiable("bias_gelu")
    def backward(ctx, a):
        g, x, b = ctx.saved_tensors
        b2, x3, g3, a3 = kernel_operands(b, (x, g, a))
        dg, du = run_kernel("gelu_double_backward", reference_double_backward, x.device, a3, g3, x3, b2, ctx.tanh_form)
        return shaped(dg, g.shape), shaped(du, x.shape), shaped(du.sum(1), b.shape), None

    @staticmethod
    def vmap(info, in_dims, g, x, b, tanh_form):
        (dx,), (dim,) = task_vmap(lambda *a: (_BiasGeluBackward.apply(*a),), info, in_dims, (g, x, b, tanh_form), 2, 1)
        return dx, dim


# ------------------------------------------------------------------------------------------ public

def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) over the last dimension, fused and twice differentiable (see the module docstring)."""
    op = "bias_gelu"
    _checks.require_tensor(op, "x", x)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{op}: argument 'approximate' must be one of {APPROXIMATIONS}, got {approximate!r}")
    if x.dim() < 1:
        raise ValueError(f"{op}: argument 'x' must have at least one dimension, got shape []")
    C = x.shape[-1]
    if bias is None:
        bias = torch.zeros(C, dtype=x.dtype, device=x.device)
    _checks.require_tensor(op, "bias", bias)
    _checks.require_like(op, "bias", bias, "x", x)
    if bias.dim() < 1 or x.dim() < bias.dim() or bias.shape[-1] != C or x.shape[:bias.dim() - 1] != bias.shape[:-1]:
        raise ValueError(
            f"{op}: argument 'bias' must be [C] or [*task, C] with x [*task, ..., C] (C = x's last size), "
            f"got bias {_checks.shape_str(bias.shape)} for x {_checks.shape_str(x.shape)}"
        )
    if x.numel() == 0:
        return torch.nn.functional.gelu(x + bias.reshape(*bias.shape[:-1], *([1] * (x.dim() - bias.dim())), C),
                                        approximate=approximate)
    if bias.dim() <= 2:
        return apply(_BiasGelu, x, bias, approximate == "tanh")
    N = bias.numel() // C
    return apply(_BiasGelu, x.reshape(N, -1, C), bias.reshape(N, C), approximate == "tanh").reshape(x.shape)
