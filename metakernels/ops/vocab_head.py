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

Each pass walks the tasks and rows in chunks, recomputing a chunk's logits from h and W (the forward
keeps only the per-row logsumexp), so the peak is one chunk's logits (two such buffers in the double
backward: the logits and their tangent u).  A chunk holds whole tasks where they fit (about 2^24 logits),
so that each task's weight gradient is written once; a task with more rows than that is cut into pieces
of rows; an explicit ``chunk_rows`` takes that many rows of every task per chunk.  A vmap rule stacks the
tasks of ``torch.vmap`` into one batched call, reading per-task weights where they are (views into the
flat fast weights are not copied).  The passes are batched matrix products (metakernels.ops.matmul) and, for
the element-wise work on each chunk of logits, the fused row kernels of metakernels.ops.xent (C++ CPU,
CUDA, Triton, reference; one or two reads of a row where the PyTorch composition made four to eight
passes); the triple derivative raises (_autograd.twice_differentiable).
"""
from __future__ import annotations

import torch

from .._autograd import apply, cached_signature, twice_differentiable
from . import _checks, xent
from ._task_batch import task_vmap
from .matmul import task_bmm

# NOTE: 2^24 logits (64 MB in fp32) per chunk.  Chunks of rows across all tasks (32 rows per task at V = 32k
# and 16 tasks) made every chunk read and rewrite the whole [N, V, D] weight gradient: 16 tasks x 128 rows,
# D=128, V=32k, forward + backward + double backward took 1.61 s, and 1.08 s with chunks of whole tasks
# (4 here), which write each task's weight gradient once (same run, benchmarks/RESULTS.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _chunks(N: int, R: int, V: int, chunk_rows: int) -> list[tuple[slice, slice]]:
    """(tasks, rows) slices of the chunks, in order (a task's rows in increasing order).  chunk_rows > 0:
    that many rows of every task per chunk; 0: whole tasks, as many as fit in DEFAULT_CHUNK_ELEMENTS logits,
    or one task's rows in pieces of that size when a task alone exceeds it (resolved here, after a vmap
    rule has folded its tasks into N)."""
    if chunk_rows:
        return [(slice(0, N), slice(lo, min(R, lo + chunk_rows))) for lo in range(0, R, chunk_rows)]
    per_task = max(1, R * V)
    if per_task <= DEFAULT_CHUNK_ELEMENTS:
        tasks = DEFAULT_CHUNK_ELEMENTS // per_task
        return [(slice(t, min(N, t + tasks)), slice(0, R)) for t in range(0, N, tasks)]
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // V)
    return [(slice(t, t + 1), slice(lo, min(R, lo + rows))) for t in range(N) for lo in range(0, R, rows)]


def _product_into(out, first: bool, a, b):
    """out = a @ b for a task's first chunk of rows, out += a @ b for its next ones (out: the chunk's tasks'
    slice of a weight gradient, summed over rows)."""
    return task_bmm(a, b, out=out) if first else task_bmm(a, b, out, out=out)


def _row_sum_into(out, first: bool, x):
    """out = the sum of x over its rows for a task's first chunk, out += it for the next ones."""
    return torch.sum(x, 1, out=out) if first else out.add_(x.sum(1))


def _logits(h, w, b):
    """One chunk's logits [n, r, V] from its rows h [n, r, D], weights w [n, V, D] and bias b [n, V] or None."""
    return task_bmm(h, w.transpose(1, 2), None if b is None else b.unsqueeze(1))


def _row_weights(targets, ignore_index):
    """m_r / M per row ([N, R]): 1 / (the task's count of counted rows), 0 for ignored rows; NaN for every
    row of a task whose rows are all ignored (0 / 0: its loss is NaN, as PyTorch's cross_entropy says)."""
    counted = (targets != ignore_index).to(torch.float64)
    return counted / counted.sum(1, keepdim=True)


def _of(x, tasks):
    return None if x is None else x[tasks]


def _row_operands(lse, targets, c, t, r):
    """The xent kernels' per-row operands of chunk (t, r): lse, targets (an ignored row's read as 0: its
    coefficient is 0) and coefficients, each contiguous [rows]."""
    return tuple(x.reshape(-1).contiguous() for x in (lse[t, r], targets[t, r].clamp_min(0), c[t, r]))


def _forward(h, w, b, targets, rows, ignore_index):
    N, R, _ = h.shape
    counted = targets[targets != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= w.shape[1]):
        raise ValueError(f"linear_cross_entropy: argument 'targets' holds {int(counted.min())}..{int(counted.max())}, "
                         f"outside the vocabulary [0, {w.shape[1]}) (ignore_index={ignore_index} is skipped)")
    weights = _row_weights(targets, ignore_index).to(h.dtype)
    lse = torch.empty((N, R), dtype=h.dtype, device=h.device)
    loss = torch.zeros(N, dtype=h.dtype, device=h.device)
    for t, r in _chunks(N, R, w.shape[1], rows):
        z = _logits(h[t, r], w[t], _of(b, t))
        lse[t, r] = xent.forward(z).view(z.shape[:-1])
        z_y = z.gather(-1, targets[t, r].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        loss[t] += ((lse[t, r] - z_y) * weights[t, r]).sum(1)
    return loss, lse


def _backward(g, h, w, b, targets, lse, rows, ignore_index):
    N, R, D = h.shape
    V = w.shape[1]
    c = _row_weights(targets, ignore_index).to(h.dtype) * g.unsqueeze(1)  # [N, R]
    dh, dw, db = h.new_empty((N, R, D)), h.new_empty((N, V, D)), h.new_empty((N, V))
    for t, r in _chunks(N, R, V, rows):
        delta = xent.backward_(_logits(h[t, r], w[t], _of(b, t)), *_row_operands(lse, targets, c, t, r))
        task_bmm(delta, w[t], out=dh[t, r])
        _product_into(dw[t], r.start == 0, delta.transpose(1, 2), h[t, r])
        _row_sum_into(db[t], r.start == 0, delta)
    return dh, dw, db


def _logit_tangent(a_h, a_w, a_b, h, w):
    """u = W A_h + A_W h + A_b for one chunk (its rows' h and cotangent A_h, its tasks' W, A_W, A_b), in a new
    buffer; a None cotangent's term is zero, and its product is skipped (at least one is given)."""
    if a_h is None and a_w is None:
        return a_b.unsqueeze(1).repeat(1, h.shape[1], 1)
    u = task_bmm(a_h, w.transpose(1, 2)) if a_h is not None else None
    if a_w is not None:
        u = task_bmm(h, a_w.transpose(1, 2), u, out=u)
    return u if a_b is None else u.add_(a_b.unsqueeze(1))


def _double_backward(a_h, a_w, a_b, g, h, w, b, targets, lse, rows, ignore_index):
    N, R, D = h.shape
    V = w.shape[1]
    weights = _row_weights(targets, ignore_index).to(h.dtype)
    c = weights * g.unsqueeze(1)
    d_h, d_w, d_b = h.new_empty((N, R, D)), h.new_empty((N, V, D)), h.new_empty((N, V))
    d_g = torch.zeros_like(g)
    for t, r in _chunks(N, R, V, rows):
        first = r.start == 0
        # Two chunk-sized buffers: the logits (then delta) and their tangent u (then s), updated in place.
        delta = _logits(h[t, r], w[t], _of(b, t))
        s = _logit_tangent(_of(a_h, (t, r)), _of(a_w, t), _of(a_b, t), h[t, r], w[t])
        pu_minus_u_y = xent.double_backward_(delta, s, *_row_operands(lse, targets, c, t, r))
        d_g[t] += (weights[t, r] * pu_minus_u_y.view(delta.shape[:-1])).sum(1)
        task_bmm(s, w[t], out=d_h[t, r])
        if a_w is not None:
            task_bmm(delta, a_w[t], d_h[t, r], out=d_h[t, r])
        _product_into(d_w[t], first, s.transpose(1, 2), h[t, r])
        if a_h is not None:
            task_bmm(delta.transpose(1, 2), a_h[t, r], d_w[t], out=d_w[t])
        _row_sum_into(d_b[t], first, s)
    return d_g, d_h, d_w, d_b


@cached_signature
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
        return task_vmap(_LinearCrossEntropy.apply, info, in_dims, (h, w, b, targets, rows, ignore_index), 1, 2)


@cached_signature
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
    @twice_differentiable("linear_cross_entropy")
    def backward(ctx, a_h, a_w, a_b):
        g, h, w, b, targets, lse = ctx.saved_tensors
        if a_h is None and a_w is None and (a_b is None or b is None):
            return (None,) * 8
        d_g, d_h, d_w, d_b = _double_backward(a_h, a_w, None if b is None else a_b, g, h, w, b, targets, lse,
                                              ctx.rows, ctx.ignore_index)
        return d_g, d_h, d_w, None if b is None else d_b, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, g, h, w, b, targets, lse, rows, ignore_index):
        return task_vmap(_LinearCrossEntropyBackward.apply, info, in_dims,
                         (g, h, w, b, targets, lse, rows, ignore_index), 2, 2)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T + bias`` against ``targets`` per task, without materialising
    the logits (see the module docstring).  ``weight`` [V, D] gives a scalar loss; [*task, V, D] (with
    h [*task, ..., D], targets [*task, ...]) gives one loss per task.  ``chunk_rows``: rows per task per
    chunk (default: whole tasks, about 2^24 logits per chunk; see the module docstring)."""
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
    if chunk_rows is not None:
        chunk_rows = _checks.require_int(f"{op}: argument 'chunk_rows'", chunk_rows, 1, note=" or None")
    N = weight[..., 0, 0].numel()
    h3 = h.reshape(N, -1, D)
    if h3.shape[1] == 0:
        raise ValueError(f"{op}: argument 'h' has no rows (shape {_checks.shape_str(h.shape)}); the mean loss is undefined")
    loss, _ = apply(_LinearCrossEntropy, h3.contiguous(), weight.reshape(N, V, D).contiguous(),
                    None if bias is None else bias.reshape(N, V).contiguous(),
                    targets.reshape(N, -1), chunk_rows or 0, int(ignore_index))
    return loss.reshape(task_shape)
