"""Which parameters of a model adapt in the inner loop, and their flat [P] layout.

The adapted parameters are concatenated (model order) into one vector of P elements, so that the
fused update ops run on [T, P] fast weights; ``unflatten`` gives per-parameter views back."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

AdaptSpec = None | Callable[[str, nn.Parameter], bool] | Iterable[str]


class ParamLayout:
    def __init__(self, model: nn.Module, adapt: AdaptSpec = None):
        named = list(model.named_parameters())
        trainable = [(n, p) for n, p in named if p.requires_grad]
        if adapt is None:
            chosen = trainable
        elif callable(adapt):
            chosen = [(n, p) for n, p in trainable if adapt(n, p)]
        else:
            wanted = list(adapt)
            known = {n for n, _ in named}
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise ValueError(f"adapt: no parameter named {unknown[:5]} in the model (it has e.g. {sorted(known)[:5]})")
            frozen = [n for n in wanted if not dict(named)[n].requires_grad]
            if frozen:
                raise ValueError(f"adapt: parameters {frozen[:5]} have requires_grad=False and never adapt")
            wanted_set = set(wanted)
            chosen = [(n, p) for n, p in trainable if n in wanted_set]
        if not chosen:
            raise ValueError(
                "the model has no parameter to adapt: every parameter is frozen or excluded by 'adapt'; "
                "give a predicate or list of names that selects at least one trainable parameter"
            )
        self.names = [n for n, _ in chosen]
        self.shapes = [p.shape for _, p in chosen]
        self.numels = [p.numel() for _, p in chosen]
        self.numel = sum(self.numels)
        self._module = model

    def parameters(self) -> list[nn.Parameter]:
        params = dict(self._module.named_parameters())
        return [params[n] for n in self.names]

    def flatten(self, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The adapted parameters (or ``values``, by name, in their place) as one differentiable [P]
        vector."""
        tensors = self.parameters() if values is None else [values[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., P] -> {name: [..., *shape]} views."""
        lead = flat.shape[:-1]
        return {n: chunk.reshape(*lead, *s) for n, s, chunk in zip(self.names, self.shapes, flat.split(self.numels, dim=-1))}
