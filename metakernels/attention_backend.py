"""Second-order meta-gradients through torch's ``scaled_dot_product_attention``.

torch's fused SDPA kernels (flash and memory-efficient attention, on CPU and CUDA) have no double
backward, so a model built on ``F.scaled_dot_product_attention`` (``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``, Hugging Face models with ``attn_implementation="sdpa"``) failed
second-order MAML and learned-optimizer training.  SDPA's math backend is plain differentiable ops
(scores, mask, softmax, weighted sum: exactly what eager attention computes), so while a second-order
meta-step builds its graph, SDPA runs on it.  First-order steps and evaluation keep the fused kernels.
NOTE: torch's backend switch (``torch.nn.attention.sdpa_kernel``) is process-wide, not per thread: SDPA
called by another thread during such a step runs on the math backend too.
"""
from __future__ import annotations

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel


def twice_differentiable_attention(second_order: bool):
    """A context in which SDPA can be differentiated twice when ``second_order`` (its math backend), and
    nothing otherwise."""
    return sdpa_kernel([SDPBackend.MATH]) if second_order else contextlib.nullcontext()
