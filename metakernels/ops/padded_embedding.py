"""An embedding lookup with a ``padding_idx`` whose weight is vmapped (each task's own table, as in the
inner loop's vmap over fast weights), with torch's gradient for the padding row.

torch's vmap rule for ``embedding`` with a batched weight looks the tasks' tables up as one [T * V, D]
table, indices offset by t * V, and passes ``padding_idx`` unchanged: it then names a row of the first
task's table only, so every other task's padding row receives gradient (torch 2.14.1; the sequential
lookup gives it none).  In MAML the inner steps then move the padding token's embedding for all tasks but
the first, and the meta-gradient is wrong wherever a batch holds the padding token (measured: 4e-5 to 6e-5
relative on a small BERT, whose padding_idx is 0, in float64).

    y[..., :] = W[i[...], :]                      (every position, as F.embedding)
    dL/dW[r]  = sum over positions with i = r of dL/dy,   and 0 for r = padding_idx

The lookup runs without ``padding_idx``, and the output at padding positions is replaced by its detached
value: the same values, and no gradient (of any order) reaches the padding row from them; no other
position reads that row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int, max_norm=None,
                     norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> torch.Tensor:
    """F.embedding(input, weight, padding_idx, ...) with no gradient to row ``padding_idx`` (module
    docstring), for a weight torch.vmap batches.  ``padding_idx`` may be negative, as F.embedding takes it."""
    row = padding_idx if padding_idx >= 0 else weight.shape[0] + padding_idx
    looked_up = F.embedding(input, weight, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    return torch.where((input == row).unsqueeze(-1), looked_up.detach(), looked_up)
