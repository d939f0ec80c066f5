"""Refuses a model that recomputes its forward during a backward (activation checkpointing).

The meta-algorithms call the model with a task's fast weights through ``torch.func.functional_call``,
which swaps them in only while the forward runs.  ``torch.utils.checkpoint`` (and Hugging Face's
``gradient_checkpointing_enable()``, which uses it) frees a block's activations and recomputes them
when the backward reaches the block, by calling the block again: by then the module holds its own
parameters, so the recomputed activations, and with them the inner gradients and the meta-gradient,
would be those of the shared weights, not the task's.  With ``use_reentrant=False`` torch does not
notice (the results are silently wrong; under ``torch.vmap`` it fails with an "escaped tensor" error);
with ``use_reentrant=True`` it refuses ``torch.autograd.grad`` and advises ``use_reentrant=False``.

The guard watches, during the backwards metakernels runs, for a forward of any of the model's modules
(a global forward pre-hook, installed only for the backward) and raises with what to do instead."""
from __future__ import annotations

import contextlib

from torch import nn


class RecomputedForwardError(RuntimeError):
    """The model ran a forward during a backward: activation checkpointing, which fast weights cannot use."""


def _message(where: str, what: str) -> str:
    return (f"{where}: {what} during the backward (activation checkpointing: torch.utils.checkpoint, or Hugging "
            "Face's gradient_checkpointing_enable()). The recomputation runs with the module's own parameters, "
            "not the task's fast weights, so the inner gradients and the meta-gradient would be wrong. Turn "
            "checkpointing off (Hugging Face: model.gradient_checkpointing_disable()) and save memory with "
            "memory='low' or task_chunk instead")


@contextlib.contextmanager
def forward_not_recomputed(model: nn.Module, where: str):
    """Runs the body (a ``torch.autograd.grad`` through ``model`` called with fast weights) and raises
    :class:`RecomputedForwardError` if one of ``model``'s modules runs a forward meanwhile."""
    def refuse(module, args):  # runs only when a forward runs inside the backward: look the module up then
        name = next((name for name, known in model.named_modules() if known is module), None)
        if name is not None:
            label = name or "the model"
            raise RecomputedForwardError(_message(where, f"{label!r} ({type(module).__name__}) ran its forward again"))

    handle = nn.modules.module.register_module_forward_pre_hook(refuse)
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, RecomputedForwardError) or "use_reentrant=True" not in str(exc):
            raise
        raise RecomputedForwardError(_message(where, "a checkpointed block (use_reentrant=True) was to run again")) from exc
    finally:
        handle.remove()
