"""Loss scaling for the meta-gradients MAML's chunked modes (task_chunk, memory="low") take inside the
forward, where float16 carries the backward.

``torch.amp.GradScaler`` multiplies the loss the caller differentiates by a large factor, so that the
backward's small float16 values do not flush to zero.  The chunked modes differentiate each chunk of
tasks before that, with a seed of 1: under float16 autocast their meta-gradient came out all zeros
where the fast mode's was 6e-4 off the float32 one (a loss of order 1e-6, measured on CPU).  So where
float16 autocast is on for the parameters' device, or the parameters are float16, each chunk's
meta-loss is multiplied by a power of two s before it is differentiated, and the gradients divided by s
(exact: s is a power of two).  Like GradScaler's, s starts at 2**16 and is dynamic: after a chunk
whose gradients overflow, s halves for the following chunks, and that chunk is taken again unscaled (the
same random draws), as it was before this scaling, so that the scale never adds an Inf; after
``GROWTH_INTERVAL`` chunks without an overflow s doubles."""
from __future__ import annotations

import torch

INITIAL = 2.0 ** 16
GROWTH_INTERVAL = 2000  # chunks, as GradScaler's default growth_interval (in steps)


def float16_backward(params: list[torch.Tensor]) -> bool:
    """Whether the backward of a loss of ``params`` runs in float16: float16 autocast on for their device,
    or float16 parameters."""
    if not params:
        return False
    device = params[0].device.type
    autocast16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    return autocast16 or any(p.dtype == torch.float16 for p in params)


class ChunkLossScale:
    """The current factor ``value`` and its updates (the module docstring)."""

    def __init__(self):
        self.value = INITIAL
        self._good_chunks = 0

    def accepts(self, grads) -> bool:
        """Whether a chunk's gradients taken at scale ``value`` (None for unused targets) are all finite.
        If not, ``value`` halves (down to 1) and the caller retakes the chunk unscaled."""
        checks = [torch.isfinite(g).all() for g in grads if g is not None]
        if not checks or bool(torch.stack(checks).all()):  # one device sync for all the targets
            self._good_chunks += 1
            if self._good_chunks >= GROWTH_INTERVAL:
                self.value, self._good_chunks = self.value * 2.0, 0
            return True
        self.value, self._good_chunks = max(self.value / 2.0, 1.0), 0
        return False
