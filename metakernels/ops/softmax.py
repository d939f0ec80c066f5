"""Fused, twice-differentiable causal softmax: the attention scores' mask + softmax chain.

    causal_softmax(scores, scale)      # scores: [..., S_q, S_k] -> attention weights, same shape

Row i (a query position, counted within the last-but-one dimension) attends to keys j <= i + (S_k - S_q)
(the usual causal mask, aligned at the end): p_j = exp(scale s_j - m) / Z over those j, and 0 elsewhere.
With c = <p, g> and A = <p, a> per row:

    backward:         ds = scale p (g - c)
    double backward:  for the cotangent a of ds, the backward is a function of (g, p):
                      dg = scale p (a - A),   dp = scale (a (g - c) - A g)
                      and autograd carries dp to the scores through p's own (differentiable) backward.

Every quantity is a per-row reduction or a per-element expression, so each of the three is one fused
row kernel (C++ CPU, CUDA, Triton, and the plain-PyTorch reference); the masked keys have p = 0, so only
the forward needs the mask.  The op has no parameters: its vmap rule passes the vmapped dimension on as
one more leading dimension.  The triple derivative raises.
"""
from __future__ import annotations

import torch

from .._autograd import apply, cached_signature, twice_differentiable
from . import _checks
from ._common import to_acc
from ._task_batch import run_kernel, shaped, task_vmap


# ----------------------------------------------------------------------------------------- reference
# Over canonical shapes [N, S_q, S_k].

def _mask(S_q: int, S_k: int, device) -> torch.Tensor:
    """True where a key is hidden from a query."""
    return torch.ones(S_q, S_k, dtype=torch.bool, device=device).triu(S_k - S_q + 1)


def reference_forward(s, scale: float):
    z = (to_acc(s) * scale).masked_fill(_mask(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    return torch.softmax(z, -1).to(s.dtype)


def reference_backward(g, p, scale: float):
    pa, ga = to_acc(p), to_acc(g)
    return (scale * pa * (ga - (pa * ga).sum(-1, keepdim=True))).to(p.dtype)


def reference_double_backward(a, g, p, scale: float):
    pa, ga, aa = to_acc(p), to_acc(g), to_acc(a)
    c = (pa * ga).sum(-1, keepdim=True)
    A = (pa * aa).sum(-1, keepdim=True)
    return (scale * pa * (aa - A)).to(p.dtype), (scale * (aa * (ga - c) - A * ga)).to(p.dtype)


# ---------------------------------------------------------------------------------- autograd wiring

def _rows(*ts):
    """Operands [..., S_q, S_k] in the kernels' canonical contiguous [N, S_q, S_k]."""
    return tuple(t.reshape(-1, *t.shape[-2:]).contiguous() for t in ts)


@cached_signature
class _CausalSoftmax(torch.autograd.Function):
    """p = causal_softmax(scale s) for scores s [..., S_q, S_k]; p has s's shape."""

    @staticmethod
    def forward(s, scale):
        return shaped(run_kernel("softmax_forward", reference_forward, s.device, *_rows(s), scale), s.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return _CausalSoftmaxBackward.apply(g, p, ctx.scale), None

    @staticmethod
    def vmap(info, in_dims, s, scale):
        (p,), (dim,) = task_vmap(lambda *a: (_CausalSoftmax.apply(*a),), info, in_dims, (s, scale))
        return p, dim


@cached_signature
class _CausalSoftmaxBackward(torch.autograd.Function):
    """ds = scale p (g - <p, g>): a fused kernel whose own backward is the fused double backward.  p (the
    forward's output) is an input, so the double backward reaches the scores through p's backward."""

    @staticmethod
    def forward(g, p, scale):
        return shaped(run_kernel("softmax_backward", reference_backward, p.device, *_rows(g, p), scale), p.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, p, scale = inputs
        ctx.save_for_backward(g, p)
        ctx.scale = scale

    @staticmethod
    @twice_differentiable("causal_softmax")
    def backward(ctx, a):
        g, p = ctx.saved_tensors
        dg, dp = run_kernel("softmax_double_backward", reference_double_backward, p.device, *_rows(a, g, p), ctx.scale)
        return shaped(dg, p.shape), shaped(dp, p.shape), None

    @staticmethod
    def vmap(info, in_dims, g, p, scale):
        (ds,), (dim,) = task_vmap(lambda *a: (_CausalSoftmaxBackward.apply(*a),), info, in_dims, (g, p, scale))
        return ds, dim


# ------------------------------------------------------------------------------------------ public

def causal_softmax(scores: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """softmax(scale * scores) over the last dimension with the causal mask (see the module docstring)."""
    op = "causal_softmax"
    _checks.require_tensor(op, "scores", scores)
    scale = _checks.require_number(op, "scale", scale)
    if scores.dim() < 2:
        raise ValueError(f"{op}: argument 'scores' must be [..., S_q, S_k], got shape {_checks.shape_str(scores.shape)}")
    S_q, S_k = scores.shape[-2:]
    if S_k < S_q:
        raise ValueError(f"{op}: argument 'scores' has S_k={S_k} keys for S_q={S_q} queries; the causal mask "
                         "(aligned at the end) would leave the first queries no key")
    if scores.numel() == 0:
        return scores.clone()
    return apply(_CausalSoftmax, scores, scale)
