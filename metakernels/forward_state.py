"""What a forward draws from and writes to, to run it again as it ran the first time: the random-number
state (the CPU generator's, and the device's on CUDA: dropout masks) and the model's buffers (BatchNorm's
running statistics and batch count, any state a forward updates in place).  MAML's reverse sweep
recomputes inner steps, a chunk whose loss-scaled gradients overflowed is taken again unscaled
(:mod:`metakernels.chunk_scale`), and the task loop follows a torch.vmap trace that failed part way
(:mod:`metakernels.inner_loop`): each runs forwards a second time, which must draw the same masks and
must not update the buffers twice (measured before buffers were restored: memory="low" counted 15
BatchNorm batches for the 9 forwards of 3 tasks and 2 inner steps)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ForwardState(NamedTuple):
    device: torch.device
    device_rng: torch.Tensor | None
    cpu_rng: torch.Tensor
    buffers: list[tuple[torch.Tensor, torch.Tensor]]  # (buffer, a copy)


def capture(device: torch.device, model: nn.Module) -> ForwardState:
    """The state now: the device generator's (None off CUDA), the CPU generator's, and a copy of each of
    ``model``'s buffers.  NOTE: the copies cost the buffers' bytes per captured step: none for the built-in
    LM and transformers' GPT-2, 8192 bytes for BERT's default config, 2 x head_dim / 2 floats for
    Llama's rotary frequencies (transformers 5.25), a few KB of BatchNorm statistics for a small
    convolutional net."""
    device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    return ForwardState(device, device_rng, torch.get_rng_state(), buffers)


def restore(state: ForwardState) -> None:
    """Puts back a state from :func:`capture`.  Only the buffers whose values changed are copied back, so
    that a buffer a graph saved (BatchNorm's statistics in eval mode) is not marked as modified in place.
    NOTE: the values are compared because a kernel may write a buffer without counting a version
    (BatchNorm's running statistics: their ``_version`` stays put)."""
    torch.set_rng_state(state.cpu_rng)
    if state.device_rng is not None:
        torch.cuda.set_rng_state(state.device_rng, state.device)
    with torch.no_grad():
        for buffer, saved in state.buffers:
            if not torch.equal(buffer, saved):
                buffer.copy_(saved)
