"""The vocabulary head with cross-entropy, chunked over rows and twice differentiable, so that neither
the logits nor their second-order tangents exist whole (for a 32k vocabulary they are the largest
tensors of a second-order meta-step).

    linear_cross_entropy(h, weight, bias, targets)   # h: [*task, ..., D]; weight: [V, D] or [*task, V, D]
                                                     # targets: [*task, ...] int64 -> loss [*task]

The loss of each task is the mean over its rows (rows whose target is ``ignore_index`` excluded; NaN
when all are, as in PyTorch) of
``lse(z) - z[y]`` with ``z = W h + b``.  Per row r, with p = softmax(z_r), c_r = g m_r / M (g: the loss's
cotangent, m_r: 1 for a counted row, M: the count) and delta_r = c_r (p - e_y):

    backward:         dh_r = W^T delta_r,   dW = sum_r delta_r h_r^T,   db = sum_r delta_r
    double backward:  for cotangents (A_h, A_W, A_b) of (dh, dW, db), u_r = W A_h_r + A_W h_r + A_b (the
                      logits' tangent) and s_r = c_r (p * u_r - p <p, u_r>):
                      dh_r = W^T s_r + A_W^T delta_r,   dW = sum_r (s_r h_r^T + delta_r A_h_r^T),
                      db = sum_r s_r,   dg = sum_r (m_r / M) (<p, u_r> - u_r[y_r])

Each pass walks the rows in chunks of ``chunk_rows``, recomputing that chunk's logits from h and W (the
forward keeps only the per-row logsumexp), so the peak is one chunk's [N, chunk_rows, V] logits (two such
buffers in the double backward, p and u).  A vmap rule stacks the tasks of ``torch.vmap`` into one batched
call, reading per-task weights where they are (views into the flat fast weights are not copied).  The passes are
written with batched matrix products and PyTorch element-wise ops on every device (there is no compiled
kernel for this op yet); the triple derivative raises (once_differentiable).
"""
from __future__ import annotations

import torch

from . import _checks
from ._task_batch import fold_task_vmap

# NOTE: 2^24 logits (64 MB in fp32) per chunk across all tasks, 32 rows per task at V = 32k and 16 tasks.
# Measured here (2 cores, 16 tasks x 128 rows, D=128, V=32k, forward + backward + double backward):
# 8 rows per chunk 6.4 s, 32 rows 3.3 s, 128 rows (unchunked) 2.5 s, PyTorch's bmm + cross_entropy 3.6 s.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _chunks(h, w, chunk_rows: int):
    """(lo, hi) row ranges of the chunks; chunk_rows 0: about DEFAULT_CHUNK_ELEMENTS logits per chunk over
    all N tasks (resolved here, after a vmap rule has folded its tasks into N)."""
    N, R, _ = h.shape
    rows = chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, N * w.shape[1]))
    return [(start, min(R, start + rows)) for start in range(0, R, rows)]


def _logits(h, w, b, lo, hi):
    if b is None:
        return torch.bmm(h[:, lo:hi], w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), h[:, lo:hi], w.transpose(1, 2))


def _row_weights(targets, ignore_index):
    """m_r / M per row ([N, R]): 1 / (the task's count of counted rows), 0 for ignored rows; NaN for every
    row of a task whose rows are all ignored (0 / 0: its loss is NaN, as PyTorch's cross_entropy says)."""
    counted = (targets != ignore_index).to(torch.float64)
    return counted / counted.sum(1, keepdim=True)


def _probs_(z, lse, lo, hi):
    """softmax of one chunk's logits, in z's own buffer."""
    return z.sub_(lse[:, lo:hi].unsqueeze(-1)).exp_()


def _minus_onehot_(p, targets, lo, hi):
    """p - e_y in p's buffer (an ignored row's target reads as 0: its row weight is 0)."""
    y = targets[:, lo:hi].clamp_min(0).unsqueeze(-1)
    return p.scatter_add_(-1, y, -torch.ones(y.shape, dtype=p.dtype, device=p.device))


def _forward(h, w, b, targets, rows, ignore_index):
    N, R, _ = h.shape
    counted = targets[targets != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= w.shape[1]):
        raise ValueError(f"linear_cross_entropy: argument 'targets' holds {int(counted.min())}..{int(counted.max())}, "
                         f"outside the vocabulary [0, {w.shape[1]}) (ignore_index={ignore_index} is skipped)")
    weights = _row_weights(targets, ignore_index).to(h.dtype)
    lse = torch.empty((N, R), dtype=h.dtype, device=h.device)
    loss = torch.zeros(N, dtype=h.dtype, device=h.device)
    for lo, hi in _chunks(h, w, rows):
        z = _logits(h, w, b, lo, hi)
        lse[:, lo:hi] = torch.logsumexp(z, -1)
        z_y = z.gather(-1, targets[:, lo:hi].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        loss += ((lse[:, lo:hi] - z_y) * weights[:, lo:hi]).sum(1)
    return loss, lse


def _backward(g, h, w, b, targets, lse, rows, ignore_index):
    N, R, _ = h.shape
    c = _row_weights(targets, ignore_index).to(h.dtype) * g.unsqueeze(1)  # [N, R]
    dh = torch.empty_like(h)
    dw = torch.zeros_like(w)
    db = torch.zeros((N, w.shape[1]), dtype=h.dtype, device=h.device)
    for lo, hi in _chunks(h, w, rows):
        delta = _minus_onehot_(_probs_(_logits(h, w, b, lo, hi), lse, lo, hi), targets, lo, hi)
        delta.mul_(c[:, lo:hi].unsqueeze(-1))
        dh[:, lo:hi] = torch.bmm(delta, w)
        dw.baddbmm_(delta.transpose(1, 2), h[:, lo:hi])
        db += delta.sum(1)
    return dh, dw, db


def _logit_tangent(a_h, a_w, a_b, h, w, lo, hi):
    """u = W A_h + A_W h + A_b for one chunk's rows, in a new buffer; a None cotangent's term is zero, and
    its product is skipped (at least one is given)."""
    if a_h is None and a_w is None:
        return a_b.unsqueeze(1).repeat(1, hi - lo, 1)
    u = torch.bmm(a_h[:, lo:hi], w.transpose(1, 2)) if a_h is not None else None
    if a_w is not None:
        u = torch.bmm(h[:, lo:hi], a_w.transpose(1, 2)) if u is None else u.baddbmm_(h[:, lo:hi], a_w.transpose(1, 2))
    return u if a_b is None else u.add_(a_b.unsqueeze(1))


def _double_backward(a_h, a_w, a_b, g, h, w, b, targets, lse, rows, ignore_index):
    N, R, _ = h.shape
    weights = _row_weights(targets, ignore_index).to(h.dtype)
    c = weights * g.unsqueeze(1)
    d_h = torch.empty_like(h)
    d_w = torch.zeros_like(w)
    d_b = torch.zeros((N, w.shape[1]), dtype=h.dtype, device=h.device)
    d_g = torch.zeros_like(g)
    for lo, hi in _chunks(h, w, rows):
        # Two chunk-sized buffers: p (then delta) and u (then s), updated in place.
        p = _probs_(_logits(h, w, b, lo, hi), lse, lo, hi)
        u = _logit_tangent(a_h, a_w, a_b, h, w, lo, hi)
        pu = torch.matmul(p.unsqueeze(-2), u.unsqueeze(-1)).squeeze(-1)  # <p, u> per row, without a p * u temporary
        u_y = u.gather(-1, targets[:, lo:hi].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        d_g += (weights[:, lo:hi] * (pu.squeeze(-1) - u_y)).sum(1)
        ck = c[:, lo:hi].unsqueeze(-1)
        s = u.sub_(pu).mul_(p).mul_(ck)
        delta = _minus_onehot_(p, targets, lo, hi).mul_(ck)
        d_h[:, lo:hi] = torch.bmm(s, w) if a_w is None else torch.bmm(s, w).baddbmm_(delta, a_w)
        d_w.baddbmm_(s.transpose(1, 2), h[:, lo:hi])
        if a_h is not None:
            d_w.baddbmm_(delta.transpose(1, 2), a_h[:, lo:hi])
        d_b += s.sum(1)
    return d_g, d_h, d_w, d_b


class _LinearCrossEntropy(torch.autograd.Function):
    """loss [N] = mean-over-rows CE of (h [N, R, D] @ w [N, V, D]^T + b [N, V] | None, targets [N, R])."""

    @staticmethod
    def forward(h, w, b, targets, rows, ignore_index):
        return _forward(h, w, b, targets, rows, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        h, w, b, targets, rows, ignore_index = inputs
        ctx.save_for_backward(h, w, b, targets, output[1])
        ctx.rows, ctx.ignore_index = rows, ignore_index
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _glse):
        h, w, b, targets, lse = ctx.saved_tensors
        dh, dw, db = _LinearCrossEntropyBackward.apply(g, h, w, b, targets, lse, ctx.rows, ctx.ignore_index)
        return dh, dw, None if b is None else db, None, None, None

    @staticmethod
    def vmap(info, in_dims, h, w, b, targets, rows, ignore_index):
        return fold_task_vmap(_LinearCrossEntropy.apply, info, in_dims, h, w, b, targets, rows, ignore_index,
                              contiguous=False)


class _LinearCrossEntropyBackward(torch.autograd.Function):
    """(dh, dw, db) of the head at (g, h, w, b); its own backward is the chunked double backward."""

    @staticmethod
    def forward(g, h, w, b, targets, lse, rows, ignore_index):
        return _backward(g, h, w, b, targets, lse, rows, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, h, w, b, targets, lse, rows, ignore_index = inputs
        ctx.save_for_backward(g, h, w, b, targets, lse)
        ctx.rows, ctx.ignore_index = rows, ignore_index
        ctx.set_materialize_grads(False)  # an unused gradient (dh when only the head adapts) costs no products

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a_h, a_w, a_b):
        g, h, w, b, targets, lse = ctx.saved_tensors
        if a_h is None and a_w is None and (a_b is None or b is None):
            return (None,) * 8
        d_g, d_h, d_w, d_b = _double_backward(a_h, a_w, None if b is None else a_b, g, h, w, b, targets, lse,
                                              ctx.rows, ctx.ignore_index)
        return d_g, d_h, d_w, None if b is None else d_b, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, g, h, w, b, targets, lse, rows, ignore_index):
        return fold_task_vmap(_LinearCrossEntropyBackward.apply, info, in_dims, g, h, w, b, targets, lse, rows,
                              ignore_index, contiguous=False)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T + bias`` against ``targets`` per task, without materialising
    the logits (see the module docstring).  ``weight`` [V, D] gives a scalar loss; [*task, V, D] (with
    h [*task, ..., D], targets [*task, ...]) gives one loss per task.  ``chunk_rows``: rows per task per
    chunk (default: about 2^22 logits per chunk)."""
    op = "linear_cross_entropy"
    _checks.task_matrices(op, "h", h, weight, "V", "D")
    task_shape, (V, D) = weight.shape[:-2], weight.shape[-2:]
    if bias is not None:
        _checks.require_tensor(op, "bias", bias)
        _checks.require_like(op, "bias", bias, "h", h)
        if bias.shape != (*task_shape, V):
            raise ValueError(f"{op}: argument 'bias' must have shape {_checks.shape_str((*task_shape, V))}, got "
                             f"{_checks.shape_str(bias.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64:
        raise TypeError(f"{op}: argument 'targets' must be an int64 tensor, got "
                        f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"{op}: argument 'targets' must have shape {_checks.shape_str(h.shape[:-1])} (h without its "
                         f"last dimension), got {_checks.shape_str(targets.shape)}")
    if targets.device != h.device:
        raise ValueError(f"{op}: argument 'targets' is on {targets.device} but 'h' is on {h.device}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"{op}: argument 'chunk_rows' must be a positive int, got {chunk_rows!r}")
    N = weight[..., 0, 0].numel()
    h3 = h.reshape(N, -1, D)
    if h3.shape[1] == 0:
        raise ValueError(f"{op}: argument 'h' has no rows (shape {_checks.shape_str(h.shape)}); the mean loss is undefined")
    loss, _ = _LinearCrossEntropy.apply(h3.contiguous(), weight.reshape(N, V, D).contiguous(),
                                        None if bias is None else bias.reshape(N, V).contiguous(),
                                        targets.reshape(N, -1), chunk_rows or 0, int(ignore_index))
    return loss.reshape(task_shape)
