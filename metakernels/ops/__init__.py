"""Fused, differentiable, task-batched ops.  Each family lives in its own module; this package exports
the public functions."""
from .attention import causal_attention
from .gelu import bias_gelu
from .learned_update import LoptHyper, learned_update, learned_update_
from .linear import task_linear
from .norm import layer_norm, rms_norm
from .softmax import causal_softmax
from .update import adam_update, momentum_update, sgd_update
from .vocab_head import linear_cross_entropy

__all__ = ["sgd_update", "momentum_update", "adam_update", "learned_update", "learned_update_", "LoptHyper",
           "layer_norm", "rms_norm", "bias_gelu", "causal_softmax", "causal_attention", "task_linear",
           "linear_cross_entropy"]
