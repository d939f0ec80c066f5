"""Plumbing shared by the fused layer ops, whose tensor operands all lead with a task dimension N
(x [N, R, D], a weight [N, D], per-row statistics [N, R]): backend dispatch, and the vmap rule."""
from __future__ import annotations

import torch

from .. import _backend


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


def fold_task_vmap(apply, info, in_dims, *args, contiguous: bool = True):
    """The vmap rule of a task-batched op: the vmapped dimension (size B) is folded into the leading task
    dimension (B * N tasks, one launch), and unfolded from every output (an output that is None stays
    None).  Operands that are not vmapped are expanded to the B copies the op then sees as separate
    tasks.  contiguous=False leaves the folded operands' strides as they are (for ops whose kernels take
    any strides)."""
    B = info.batch_size
    folded = []
    for arg, dim in zip(args, in_dims):
        if isinstance(arg, torch.Tensor):
            arg = arg.expand(B, *arg.shape) if dim is None else arg.movedim(dim, 0)
            arg = arg.reshape(B * arg.shape[1], *arg.shape[2:])
            if contiguous:
                arg = arg.contiguous()
        folded.append(arg)
    outputs = apply(*folded)
    unfolded = tuple(None if o is None else o.reshape(B, o.shape[0] // B, *o.shape[1:]) for o in outputs)
    return unfolded, tuple(None if o is None else 0 for o in unfolded)
