"""Fused, twice-differentiable, task-batched causal self-attention core.

    causal_attention(qkv, n_heads, scale=None)   # qkv: [..., S, 3 D] -> [..., S, D]

``qkv`` is a fused projection's output, [q | k | v] along the last dimension with the heads contiguous
inside each (as ``nn.Linear(D, 3 D)`` followed by ``split(D)`` and a reshape to heads, the layout of
GPT-2 and of metakernels.models); the result has the heads merged back, ready for the output projection.
Per sequence and head, with q, k, v [S, d_head] and s = ``scale`` (default d_head^-1/2):

    forward:          P = causal_softmax(s q k^T),   o = P v
    backward:         for the cotangent do of o: G = do v^T,
                      dZ = s P (G - rowsum(P G))   (the scores' cotangent, the softmax's backward),
                      dq = dZ k,   dk = dZ^T q,   dv = P^T do
    double backward:  for cotangents (aq, ak, av) of (dq, dk, dv): A = aq k^T + q ak^T (the cotangent of
                      dZ); the causal softmax's double backward gives the cotangents of G and P,
                      dG = s P (A - rowsum(P A)),   dP = s (A (G - rowsum(P G)) - rowsum(P A) G) + do av^T,
                      and P's own backward carries dP to the scores, dZp = s P (dP - rowsum(P dP)):
                      d(do) = P av + dG v,   dq = dZ ak + dZp k,   dk = dZ^T aq + dZp^T q,   dv = dG^T do

On the cpu backend each pass is one C++ kernel (csrc/cpu/attention.cpp): per (sequence, head) block, the
products register-blocked over the visible (causal) entries only, the softmax's reductions over the keys
vectorised across queries, q, k, v read from and the gradients written into the fused rows.  On the
other backends every product is a ``torch.bmm`` over (sequences x heads) at once and every per-row chain
one of the causal softmax's fused kernels (metakernels.ops.softmax: CUDA, Triton, reference).  The op
records one autograd node per pass: the head split and merge, which a model would otherwise write as
views and transposes (a node each in every pass, and copies in the products), happen inside.  The
forward stores only P besides its input (what PyTorch's composition stores too); a backward that can be
differentiated again keeps G and dZ for the double backward (the cpu kernel writes G's entries above the
diagonal as 0: P multiplies every use of them).  The triple derivative raises
(``_autograd.twice_differentiable``).
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from .._autograd import apply, cached_signature, twice_differentiable
from . import _checks, softmax
from ._task_batch import run_kernel, shaped, task_vmap
from .softmax import _rows  # [..., S_q, S_k] -> the softmax kernels' contiguous [N, S_q, S_k]


# ---------------------------------------------------------------------------------------- layout
# Inside the Functions every operand is per (sequence, head): [M H, S, d] for M sequences of S positions.

def _split_heads(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [..., S, 3 D] -> q, k, v, each [M H, S, D / H] (one copy of qkv)."""
    S, width = qkv.shape[-2:]
    d = width // (3 * n_heads)
    heads = qkv.reshape(-1, S, 3, n_heads, d).permute(2, 0, 3, 1, 4).reshape(3, -1, S, d)
    return heads.unbind(0)


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """t [..., S, D] -> [M H, S, D / H]."""
    S, D = t.shape[-2:]
    return t.reshape(-1, S, n_heads, D // n_heads).transpose(1, 2).reshape(-1, S, D // n_heads)


def _merged(per_head: torch.Tensor, shape) -> torch.Tensor:
    """[(parts,) M H, S, d] -> a new tensor of ``shape`` [..., S, parts H d] (heads merged)."""
    S, d = per_head.shape[-2:]
    parts = 1 if per_head.dim() == 3 else per_head.shape[0]
    out = torch.empty(shape, dtype=per_head.dtype, device=per_head.device)
    H = shape[-1] // (parts * d)
    out.view(-1, S, parts, H, d).copy_(per_head.view(parts, -1, H, S, d).permute(1, 3, 0, 2, 4))
    return out


def _softmax(name: str, device, *args):
    return run_kernel(f"softmax_{name}", getattr(softmax, f"reference_{name}"), device, *args)


def _fused_kernels(device):
    """The compiled extension where the cpu backend runs the call: its kernels compute the forward and the
    backward of the whole core per (sequence, head) block (csrc/cpu/attention.cpp).  None elsewhere: the
    other backends compose batched products with the causal softmax's kernels of that backend."""
    return _backend.extension() if _backend.select(device, "attention") == "cpu" else None


def _flat(t: torch.Tensor, dims: int) -> torch.Tensor:
    """t with its leading dimensions before the last ``dims`` folded into one, contiguous: the kernels'
    [M, S, width] sequences (dims=2) and [M, H, S, S] blocks (dims=3)."""
    return t.reshape(-1, *t.shape[t.dim() - dims:]).contiguous()


# ---------------------------------------------------------------------------------- autograd wiring

@cached_signature
class _CausalAttention(torch.autograd.Function):
    """(o, P) for qkv [..., S, 3 D]: o [..., S, D], and the attention weights P [..., H, S, S] (saved for
    the backward, not differentiable)."""

    @staticmethod
    def forward(qkv, n_heads, scale):
        kernels = _fused_kernels(qkv.device)
        if kernels is not None:
            o, p = kernels.attention_forward(_flat(qkv, 2), n_heads, scale)
            return o.view(*qkv.shape[:-1], o.shape[-1]), p.view(*qkv.shape[:-2], *p.shape[1:])
        q, k, v = _split_heads(qkv, n_heads)
        p = _softmax("forward", qkv.device, torch.bmm(q, k.transpose(1, 2)), scale)
        o = _merged(torch.bmm(p, v), (*qkv.shape[:-1], qkv.shape[-1] // 3))
        return o, shaped(p, (*qkv.shape[:-2], n_heads, *p.shape[-2:]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, n_heads, scale = inputs
        ctx.save_for_backward(qkv, output[1])
        ctx.n_heads, ctx.scale = n_heads, scale
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, do, _dp):
        qkv, p = ctx.saved_tensors
        kernels = _fused_kernels(qkv.device)
        if kernels is not None and not torch.is_grad_enabled():  # no double backward can follow: no G, dZ
            dqkv, _, _ = kernels.attention_backward(_flat(do, 2), _flat(qkv, 2), _flat(p, 3), ctx.n_heads, ctx.scale,
                                                    False)
            return dqkv.view(qkv.shape), None, None
        return _CausalAttentionBackward.apply(do, qkv, p, ctx.n_heads, ctx.scale)[0], None, None

    @staticmethod
    def vmap(info, in_dims, qkv, n_heads, scale):
        return task_vmap(_CausalAttention.apply, info, in_dims, (qkv, n_heads, scale))


@cached_signature
class _CausalAttentionBackward(torch.autograd.Function):
    """(dqkv, G, dZ) = the attention core's backward at (do, qkv, P); G and dZ [..., H, S, S] are kept for
    the double backward and are not differentiable.  P is the forward's (a function of qkv, not an
    independent input): the double backward carries its cotangent to q and k itself."""

    @staticmethod
    def forward(do, qkv, p, n_heads, scale):
        kernels = _fused_kernels(qkv.device)
        if kernels is not None:
            dqkv, g, dz = kernels.attention_backward(_flat(do, 2), _flat(qkv, 2), _flat(p, 3), n_heads, scale, True)
            return dqkv.view(qkv.shape), g.view(p.shape), dz.view(p.shape)
        q, k, v = _split_heads(qkv, n_heads)
        do3, (p3,) = _heads(do, n_heads), _rows(p)
        g = torch.bmm(do3, v.transpose(1, 2))
        dz = _softmax("backward", qkv.device, g, p3, scale)
        grads = torch.empty((3, *q.shape), dtype=q.dtype, device=q.device)
        torch.bmm(dz, k, out=grads[0])
        torch.bmm(dz.transpose(1, 2), q, out=grads[1])
        torch.bmm(p3.transpose(1, 2), do3, out=grads[2])
        return _merged(grads, qkv.shape), shaped(g, p.shape), shaped(dz, p.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        do, qkv, p, n_heads, scale = inputs
        _, g, dz = output
        ctx.save_for_backward(do, qkv, p, g, dz)
        ctx.n_heads, ctx.scale = n_heads, scale
        ctx.mark_non_differentiable(g, dz)

    @staticmethod
    @twice_differentiable("causal_attention")
    def backward(ctx, a, _g, _dz):
        do, qkv, p, g, dz = ctx.saved_tensors
        H = ctx.n_heads
        kernels = _fused_kernels(qkv.device)
        if kernels is not None:
            ddo, dqkv = kernels.attention_double_backward(_flat(a, 2), _flat(do, 2), _flat(qkv, 2), _flat(p, 3),
                                                          _flat(g, 3), _flat(dz, 3), H, ctx.scale)
            return ddo.view(do.shape), dqkv.view(qkv.shape), None, None, None
        q, k, v = _split_heads(qkv, H)
        aq, ak, av = _split_heads(a, H)
        do3, (p3, g3, dz3) = _heads(do, H), _rows(p, g, dz)
        big_a = torch.baddbmm(torch.bmm(aq, k.transpose(1, 2)), q, ak.transpose(1, 2))
        dg, dp = _softmax("double_backward", qkv.device, big_a, g3, p3, ctx.scale)
        dz_p = _softmax("backward", qkv.device, torch.baddbmm(dp, do3, av.transpose(1, 2)), p3, ctx.scale)
        ddo = torch.baddbmm(torch.bmm(p3, av), dg, v)
        grads = torch.empty((3, *q.shape), dtype=q.dtype, device=q.device)
        torch.baddbmm(torch.bmm(dz3, ak), dz_p, k, out=grads[0])
        torch.baddbmm(torch.bmm(dz3.transpose(1, 2), aq), dz_p.transpose(1, 2), q, out=grads[1])
        torch.bmm(dg.transpose(1, 2), do3, out=grads[2])
        return _merged(ddo, do.shape), _merged(grads, qkv.shape), None, None, None

    @staticmethod
    def vmap(info, in_dims, do, qkv, p, n_heads, scale):
        return task_vmap(_CausalAttentionBackward.apply, info, in_dims, (do, qkv, p, n_heads, scale))


# ------------------------------------------------------------------------------------------ public

def causal_attention(qkv: torch.Tensor, n_heads: int, scale: float | None = None) -> torch.Tensor:
    """Multi-head causal self-attention of a fused q|k|v projection; see the module docstring."""
    op = "causal_attention"
    _checks.require_tensor(op, "qkv", qkv)
    n_heads = _checks.require_int(f"{op}: argument 'n_heads'", n_heads, 1)
    if qkv.dim() < 2 or qkv.shape[-1] % (3 * n_heads):
        raise ValueError(f"{op}: argument 'qkv' must be [..., S, 3 * n_heads * d_head] (q|k|v of {n_heads} heads "
                         f"each), got shape {_checks.shape_str(qkv.shape)}")
    d_head = qkv.shape[-1] // (3 * n_heads)
    if scale is None:
        scale = 1.0 / math.sqrt(d_head) if d_head else 1.0
    scale = _checks.require_number(op, "scale", scale)
    if qkv.numel() == 0:
        return qkv[..., :d_head * n_heads].clone()
    return apply(_CausalAttention, qkv, n_heads, scale)[0]
