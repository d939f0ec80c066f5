"""Task-batched linear layer whose every derivative lands in the weight's own [out, in] layout.

    task_linear(x, weight, bias=None)   # x: [*task, ..., I]; weight: [O, I] or [*task, O, I];
                                        # bias: None, [O] or [*task, O] (shaped like weight's rows)

y = x W^T + b, as ``torch.nn.functional.linear``, with each task's own W when the weight has leading task
dimensions (how ``torch.vmap`` over per-task fast weights reaches the op: its vmap rule stacks the tasks
into one batched matmul).  Per task, with R rows of x:

    forward:          y = x W^T + b
    backward:         dx = g W,   dW = g^T x,   db = sum_rows g
    double backward:  for cotangents (a, A, c) of (dx, dW, db):
                      dg = a W^T + x A^T + c,   dx = g A,   dW = g^T a

Every product is a batched matmul (the vendor BLAS, or where it is faster metakernels' float32 kernel:
metakernels.ops.matmul); what the op fixes is the order of each product's operands.  PyTorch's own batched-matmul backward computes the weight's gradient as x^T g, an
[I, O] matrix that reaches the weight as a transposed view: the inner loop then copies it transposed into
the flat fast-weight rows, and adds it to the double backward's [O, I] terms with mismatched strides.
Here every weight cotangent (dW above, in both derivatives) is computed as an [O, I] product directly.
The double backward is itself made of differentiable products, so higher derivatives work too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._C._functorch import is_batchedtensor
from torch.overrides import TorchFunctionMode

from .._autograd import apply, cached_signature
from . import _checks
from ._task_batch import as_tasks, bmm_shaped, shaped, task_count, task_vmap
from .matmul import task_bmm
from .padded_embedding import padded_embedding


@cached_signature
class _TaskLinear(torch.autograd.Function):
    """y = x W^T + b for x [*rows, I] with one W [O, I] and b [O] | None, or x [N, *rows, I] with
    W [N, O, I] and b [N, O] | None; y has x's shape with O last."""

    @staticmethod
    def forward(x, w, b):
        N, (O, I) = task_count(w, 2), w.shape[-2:]
        return bmm_shaped((*x.shape[:-1], O), as_tasks(x, N), w.reshape(N, O, I).transpose(1, 2),
                          None if b is None else b.reshape(N, 1, O))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return _TaskLinearBackward.apply(g, x, w, need_x, need_w, ctx.has_bias and need_b)

    @staticmethod
    def vmap(info, in_dims, x, w, b):
        (y,), (dim,) = task_vmap(lambda *a: (_TaskLinear.apply(*a),), info, in_dims, (x, w, b), 1, 2)
        return y, dim


@cached_signature
class _TaskLinearBackward(torch.autograd.Function):
    """(dx, dW, db) = (g W, g^T x, sum_rows g), each None where not needed; shapes as _TaskLinear's."""

    @staticmethod
    def forward(g, x, w, need_x, need_w, need_b):
        N = task_count(w, 2)
        g3 = as_tasks(g, N)
        return (bmm_shaped(x.shape, g3, w.reshape(N, *w.shape[-2:])) if need_x else None,
                bmm_shaped(w.shape, g3.transpose(1, 2), as_tasks(x, N)) if need_w else None,
                shaped(g3.sum(1), w.shape[:-1]) if need_b else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, w = inputs[:3]
        ctx.save_for_backward(g, x, w)
        ctx.set_materialize_grads(False)  # an unused gradient (dx of the only adapted layer) costs no products

    @staticmethod
    def backward(ctx, a, big_a, c):
        g, x, w = ctx.saved_tensors
        N = task_count(w, 2)
        g3, x3, w3 = as_tasks(g, N), as_tasks(x, N), w.reshape(N, *w.shape[-2:])
        a3 = None if a is None else as_tasks(a, N)
        big_a3 = None if big_a is None else big_a.reshape(w3.shape)
        dg = None if c is None else c.reshape(N, 1, w3.shape[1])  # broadcast over the rows by the products
        if a3 is not None and big_a3 is not None:
            dg = task_bmm(a3, w3.transpose(1, 2), dg)
            dg = bmm_shaped(g.shape, x3, big_a3.transpose(1, 2), dg)
        elif a3 is not None or big_a3 is not None:
            left, right = (a3, w3) if a3 is not None else (x3, big_a3)
            dg = bmm_shaped(g.shape, left, right.transpose(1, 2), dg)
        elif dg is not None:
            dg = dg.expand_as(g3).reshape(g.shape)
        dx = None if big_a3 is None else bmm_shaped(x.shape, g3, big_a3)
        dw = None if a3 is None else bmm_shaped(w.shape, g3.transpose(1, 2), a3)
        return dg, dx, dw, None, None, None

    @staticmethod
    def vmap(info, in_dims, g, x, w, need_x, need_w, need_b):
        return task_vmap(_TaskLinearBackward.apply, info, in_dims, (g, x, w, need_x, need_w, need_b), 2, 2)


def _check(x, weight, bias) -> int:
    """The number of weight matrices (tasks)."""
    N = _checks.task_matrices("task_linear", "x", x, weight, "O", "I")
    if bias is not None:
        _checks.require_tensor("task_linear", "bias", bias)
        _checks.require_like("task_linear", "bias", bias, "x", x)
        if bias.shape != weight.shape[:-1]:
            raise ValueError(f"task_linear: argument 'bias' must have shape {_checks.shape_str(weight.shape[:-1])} "
                             f"(weight's without its last size), got {_checks.shape_str(bias.shape)}")
    return N


def task_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b with a per-task (or shared) weight and bias; see the module docstring."""
    N = _check(x, weight, bias)
    if weight.dim() <= 3:
        return apply(_TaskLinear, x, weight, bias)
    O, I = weight.shape[-2:]
    y = apply(_TaskLinear, as_tasks(x.reshape(N, *x.shape[weight.dim() - 2:]), N), weight.reshape(N, O, I),
              None if bias is None else bias.reshape(N, O))
    return y.reshape(*x.shape[:-1], O)


def _embedding_arguments(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                         sparse=False):
    """F.embedding's arguments, by position."""
    return input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse


class TaskLinearMode(TorchFunctionMode):
    """Routes ``torch.nn.functional.linear`` calls whose weight is vmapped (each task's own weight, as in the
    inner loop's vmap over fast weights) to ``task_linear``; every other call, and any call under autocast
    or with mixed dtypes (which ``F.linear`` would cast), runs unchanged.  Also routes
    ``torch.nn.functional.embedding`` calls with a vmapped weight and a ``padding_idx`` to
    :func:`metakernels.ops.padded_embedding.padded_embedding`, whose padding row gets no gradient as in the
    sequential lookup (torch's vmap rule gives it one for every task but the first)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding:
            arguments = _embedding_arguments(*args, **kwargs)
            if arguments[2] is not None and is_batchedtensor(arguments[1]):
                return padded_embedding(*arguments)
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if is_batchedtensor(w) and x.dtype == w.dtype and (b is None or b.dtype == w.dtype) \
                    and not torch.is_autocast_enabled(w.device.type):
                return task_linear(x, w, b)
        return func(*args, **kwargs)
