"""Fused, differentiable, task-batched ops.  Each family lives in its own module; this package exports
the public functions."""
from .update import adam_update, momentum_update, sgd_update

__all__ = ["sgd_update", "momentum_update", "adam_update"]
