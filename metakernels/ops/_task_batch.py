"""Plumbing shared by the fused layer ops: backend dispatch, and the vmap rule.

The ops' autograd Functions take their operands either with one shared weight (x [*rows, D], weight
[D] or [O, D]) or with one weight per task (x [N, *rows, D], weight [N, D] or [N, O, D]), and put them
in their canonical [N, R, D] shapes inside forward and backward, where reshapes and copies are not
recorded: a view taken outside would be an autograd node in the forward, another in the create_graph
backward, and two more evaluations in the meta-backward."""
from __future__ import annotations

import math

import torch

from .. import _backend
from .matmul import task_bmm


def _kernels(backend: str, family: str):
    if backend == "triton":
        import importlib

        return importlib.import_module(f"{__package__}.{family}_triton")
    if backend in ("cpu", "cuda"):
        return _backend.extension()
    return None


def run_kernel(name: str, reference, device: torch.device, *args):
    """Runs kernel ``name`` (``<family>_<what>``) on the backend selected for ``device``: the compiled
    extension's function of that name, the Triton module's, or ``reference`` itself."""
    backend = _backend.select(device, name)
    kernels = _kernels(backend, name.split("_", 1)[0])
    return reference(*args) if kernels is None else getattr(kernels, name)(*args)


def task_count(weight: torch.Tensor, shared_dims: int) -> int:
    """N: 1 for a shared weight (``shared_dims`` dimensions), else the weight's leading size."""
    return 1 if weight.dim() == shared_dims else weight.shape[0]


def as_tasks(t: torch.Tensor, N: int) -> torch.Tensor:
    """t [*rows, C] (N = 1) or [N, *rows, C] in the canonical [N, R, C] (a view where the strides allow)."""
    return t.reshape(N, math.prod(t.shape[:-1]) // N if N else 0, t.shape[-1])


def kernel_operands(weight: torch.Tensor, rows=(), per_row=()) -> list[torch.Tensor]:
    """The row kernels' operands, contiguous in their canonical shapes: ``weight`` [D] or [N, D] as [N, D],
    each of ``rows`` ([*rows, D] or [N, *rows, D]) as [N, R, D], each of ``per_row`` as [N, R]."""
    N = task_count(weight, 1)
    rows = [as_tasks(t, N).contiguous() for t in rows]
    return [weight.reshape(N, -1).contiguous(), *rows, *(t.reshape(rows[0].shape[:2]).contiguous() for t in per_row)]


def shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """t with ``shape``: t itself where it has that shape already.  A reshape to the same shape returns a
    view, and autograd adds a gradient in place only into a tensor that is not a view."""
    return t if t.shape == shape else t.reshape(shape)


def bmm_shaped(shape, a: torch.Tensor, b: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """The batched product a @ b (plus ``start``, broadcast, as ``torch.baddbmm``; run by
    :func:`metakernels.ops.matmul.task_bmm`) as a tensor of ``shape``
    (same elements).  Where autograd does not record, the product is written into a new tensor of that
    shape, which is returned itself rather than as a view of the product, so that autograd can add
    further gradients into it in place; where it records, the differentiable product is reshaped."""
    if torch.is_grad_enabled():
        return shaped(task_bmm(a, b, start), shape)
    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    task_bmm(a, b, start, out=out.view(a.shape[0], a.shape[1], b.shape[2]))
    return out


def row_sum(t: torch.Tensor, per_task: bool) -> torch.Tensor:
    """The sum over the rows of t [*rows, C] ([C]) or t [N, *rows, C] ([N, C]), as one op."""
    return t.sum(tuple(range(int(per_task), t.dim() - 1)))


def _vmapped_first(info, in_dims, args):
    """Tensor operands with the vmapped dimension leading (moved only where it is elsewhere), those that
    are not vmapped expanded to the B slices; other operands unchanged."""
    def first(arg, dim):
        if not isinstance(arg, torch.Tensor) or dim == 0:
            return arg
        return arg.expand(info.batch_size, *arg.shape) if dim is None else arg.movedim(dim, 0)

    return [first(arg, dim) for arg, dim in zip(args, in_dims)]


def task_vmap(apply, info, in_dims, args, weight_index: int | None = None, shared_dims: int = 0):
    """The vmap rule of a task-batched op; ``apply`` returns a tuple of outputs (None allowed).

    When each vmapped slice sees one shared weight (``args[weight_index]`` has ``shared_dims`` logical
    dimensions; the usual case, vmap over per-task fast weights) or the op has no weight
    (``weight_index`` None), the vmapped dimension becomes the task dimension: the operands go to
    ``apply`` as they are, without a reshape.  When each slice already holds per-task weights
    [N, ...], the vmapped dimension (size B) is folded into theirs (B * N tasks, one launch) and
    unfolded from every output."""
    if weight_index is None or args[weight_index].dim() - (in_dims[weight_index] is not None) == shared_dims:
        outputs = apply(*_vmapped_first(info, in_dims, args))
        return outputs, tuple(None if o is None else 0 for o in outputs)
    B = info.batch_size
    folded = [arg.reshape(B * arg.shape[1], *arg.shape[2:]) if isinstance(arg, torch.Tensor) else arg
              for arg in _vmapped_first(info, in_dims, args)]
    outputs = apply(*folded)
    unfolded = tuple(None if o is None else o.reshape(B, o.shape[0] // B, *o.shape[1:]) for o in outputs)
    return unfolded, tuple(None if o is None else 0 for o in unfolded)
