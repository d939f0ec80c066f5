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
        self._spec = (tuple(self.numels), tuple(self.shapes))

    def parameters(self) -> list[nn.Parameter]:
        params = dict(self._module.named_parameters())
        return [params[n] for n in self.names]

    def flatten(self, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The adapted parameters (or ``values``, by name, in their place) as one differentiable [P]
        vector."""
        tensors = self.parameters() if values is None else [values[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., P] -> {name: [..., *shape]} views.  Differentiable to any order; the backward writes each
        parameter's cotangent, whatever its strides, straight into one [..., P] tensor (a reshape to
        [..., numel] and a cat would copy the transposed cotangents of linear layers twice)."""
        return dict(zip(self.names, _Unflatten.apply(flat, self._spec)))


def _views(flat: torch.Tensor, spec) -> tuple[torch.Tensor, ...]:
    numels, shapes = spec
    lead = flat.shape[:-1]
    return tuple(chunk.view(*lead, *s) for s, chunk in zip(shapes, flat.split(numels, dim=-1)))


class _Unflatten(torch.autograd.Function):
    """flat [..., P] -> views [..., *shape_i]; backward: _Pack."""

    @staticmethod
    def forward(ctx, flat, spec):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.lead = spec, flat.shape[:-1]
        return _views(flat, spec)

    @staticmethod
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None
        return _Pack.apply(ctx.lead, ctx.spec, *grads), None


class _Pack(torch.autograd.Function):
    """Per-parameter tensors [..., *shape_i] (None: zeros) -> one [..., P] tensor, one strided copy each;
    backward: _Unflatten."""

    @staticmethod
    def forward(ctx, lead, spec, *parts):
        ctx.spec, ctx.present = spec, [p is not None for p in parts]
        like = next(p for p in parts if p is not None)
        flat = like.new_empty(*lead, sum(spec[0]))
        for view, part in zip(_views(flat, spec), parts):
            if part is None:
                view.zero_()
            else:
                view.copy_(part)
        return flat

    @staticmethod
    def backward(ctx, grad_flat):
        views = _Unflatten.apply(grad_flat, ctx.spec)
        return None, None, *(v if present else None for v, present in zip(views, ctx.present))
