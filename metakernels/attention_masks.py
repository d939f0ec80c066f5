"""A padding mask as an additive attention mask, so that MAML's torch.vmap over tasks can trace a
transformers model given one.

transformers turns a 2D ``attention_mask`` (1: a token, 0: padding) into the attention's mask with a
data-dependent test (``padding_mask.all()``: may the mask be dropped?), which torch.vmap cannot trace, so
MAML falls back to a Python loop over tasks (with a warning).  A 4D mask is used as given, without the
test:

    loss_fn = lambda model, batch: model(input_ids=batch["ids"], labels=batch["labels"],
                                         attention_mask=mk.additive_attention_mask(batch["mask"])).loss

The meta-gradient is the 2D mask's to float64 rounding (tests/test_attention_masks.py).  Measured on two
CPU threads (benchmarks/hf_padding_mask.py: a 2-layer BERT of width 128, T=16, K=2, three runs): the
meta-step 1.39-1.41x faster second order, 1.22-1.50x first order (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch


def additive_attention_mask(attention_mask: torch.Tensor, causal: bool = False,
                            dtype: torch.dtype | None = None) -> torch.Tensor:
    """[..., L] padding mask (nonzero or True: a token; 0 or False: padding) -> the additive mask transformers'
    attention adds to its scores, of ``dtype`` (the model's; default torch's default dtype):

        M[..., 0, i, j] = 0 if key j is a token (and j <= i when ``causal``), else finfo(dtype).min

    shaped [..., 1, 1, L] (every query sees the same keys) or, when ``causal`` (decoders such as GPT-2,
    whose causal mask a 4D mask replaces), [..., 1, L, L].  A query that sees no key (with left padding, a
    decoder's positions left of every token) gets a uniform average of the values, as in transformers' eager
    attention; its sdpa path gives such a query zeros."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"additive_attention_mask: argument 'attention_mask' must be a tensor, got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.dim() < 1 or attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"additive_attention_mask: argument 'attention_mask' must be an integer or bool tensor "
                        f"[..., L] of 0/1, got dtype {attention_mask.dtype} and shape {list(attention_mask.shape)}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"additive_attention_mask: argument 'dtype' must be a floating-point dtype, got {dtype}")
    keep = (attention_mask != 0)[..., None, None, :]  # [..., 1, 1, L]
    if causal:
        L = attention_mask.shape[-1]
        keep = keep & torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)
