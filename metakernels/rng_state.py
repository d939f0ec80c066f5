"""The random-number state a computation draws from (the CPU generator's, and the device's on CUDA), to
run it again with the same draws (dropout masks): MAML's reverse sweep recomputes inner steps, and a
chunk whose loss-scaled gradients overflowed is taken again unscaled (:mod:`metakernels.chunk_scale`)."""
from __future__ import annotations

import torch


def capture(device: torch.device):
    """The state now: (the device generator's or None, the CPU generator's)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None, torch.get_rng_state()


def restore(device: torch.device, state) -> None:
    """Puts back a state from :func:`capture`."""
    device_state, cpu_state = state
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        torch.cuda.set_rng_state(device_state, device)
