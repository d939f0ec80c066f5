"""``f``, the model bound to one task's weights, as ``loss_fn(f, batch)`` receives it and
``AdaptedModel.task(i)`` returns it."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call


class BoundModel:
    """The model called with one task's adapted parameters in place of its own.

    ``f(*args, **kwargs)`` runs the model's forward.  ``f.named_parameters()`` / ``f.parameters()`` give
    the weights that forward runs with, in the model's order: the task's adapted ones, the model's own
    for the rest.  Use them for a regulariser of the inner loss (an L2 or proximal term): the model's
    own ``model.parameters()`` are the shared initialisation, not the task's weights, and a term on them
    has no gradient with respect to the task's weights."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self.module = model
        self._params = params

    def __call__(self, *args, **kwargs):
        return functional_call(self.module, self._params, args, kwargs)

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, weight) for each of the model's parameters, the task's weight where it is adapted."""
        for name, own in self.module.named_parameters():
            yield name, self._params.get(name, own)

    def parameters(self) -> Iterator[torch.Tensor]:
        """The weights of ``named_parameters``, without their names."""
        for _, weight in self.named_parameters():
            yield weight
