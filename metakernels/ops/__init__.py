"""Fused, differentiable, task-batched ops.  Each family lives in its own module; this package exports
the public functions."""
from .learned_update import LoptHyper, learned_update
from .update import adam_update, momentum_update, sgd_update

__all__ = ["sgd_update", "momentum_update", "adam_update", "learned_update", "LoptHyper"]
