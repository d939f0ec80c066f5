"""A learn2learn-compatible facade, so that existing per-task loops migrate by changing one import:

    from metakernels.compat import MAML            # was: from learn2learn.algorithms import MAML
    maml = MAML(model, lr=0.1, first_order=False)
    for task in tasks:
        learner = maml.clone()
        learner.adapt(loss_fn(learner(x_support), y_support))
        loss_fn(learner(x_query), y_query).backward()

The semantics are learn2learn's (``clone``, ``adapt(loss)`` taking one SGD step with the inner gradient
kept in the graph unless first order, ``allow_unused``, ``allow_nograd``, MetaSGD's per-parameter
``lrs``), and each step runs the fused update op.  For speed, move to the batched :class:`metakernels.MAML`
(see the README's migration guide): this facade still loops over tasks in Python.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .compat_view import ModuleView
from .layout import ParamLayout, refuse_parameters_without_data
from .ops._checks import require_bool
from .recompute_guard import forward_not_recomputed


class _Learner(nn.Module):
    """One task's clone: the model called with its own (differentiable) copy of the parameters, and its own
    settings (learn2learn's clone is a MAML of its own: changing them on one clone leaves the others).
    As in learn2learn, ``learner.module`` is the model as this clone has it, and an attribute the clone
    does not have is that module's (``learner.features(x)`` runs with the clone's weights; see
    :mod:`metakernels.compat_view`); ``train()`` / ``eval()`` set the clone's modes, not the model's."""

    def __init__(self, owner: "MAML", params: dict[str, torch.Tensor], modes: dict[str, bool], first_order: bool,
                 allow_unused: bool, allow_nograd: bool):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: keeps owner's parameters single
        self._fast = params
        self._modes = modes
        self.training = modes[""]
        self.first_order, self.allow_unused, self.allow_nograd = first_order, allow_unused, allow_nograd

    @property
    def module(self) -> ModuleView:
        """The model with this clone's weights and train/eval modes."""
        return ModuleView(self._owner.module, self._owner.module, self._fast, self._modes, not self.first_order)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "_Learner":
        """Sets this clone's train/eval mode, of every module of the model as the clone runs it."""
        self.training = require_bool("mode", mode)
        self.module.train(mode)
        return self

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """This clone's current (adapted) parameters by name, in the model's order, as learn2learn's clone
        has them (``parameters()`` gives the same without names): an inner-loss regulariser on them acts on
        the task's weights."""
        return self.module.named_parameters(prefix, recurse, remove_duplicate)

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> "_Learner":
        """A copy of this clone's current parameters and modes; unset settings are this clone's."""
        return _Learner(self._owner, dict(self._fast), dict(self._modes),
                        *_settings(self, first_order, allow_unused, allow_nograd))

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> None:
        """One inner step in place: params <- params - lr * d loss / d params."""
        first_order, allow_unused, allow_nograd = _settings(self, first_order, allow_unused, allow_nograd)
        owner = self._owner
        frozen = [n for n, p in owner.module.named_parameters() if not p.requires_grad]
        if frozen and not allow_nograd:
            raise ValueError(
                f"parameters {frozen[:3]} have requires_grad=False; pass allow_nograd=True to adapt only the others"
            )
        layout = ParamLayout(owner.module)  # every trainable parameter, in model order
        with forward_not_recomputed(owner.module, "compat.MAML adapt"):
            grads = torch.autograd.grad(loss, [self._fast[n] for n in layout.names], retain_graph=not first_order,
                                        create_graph=not first_order, allow_unused=allow_unused)
        flat_grads = layout.flatten({n: torch.zeros_like(self._fast[n]) if g is None else g
                                     for n, g in zip(layout.names, grads)})
        updated = ops.sgd_update(layout.flatten(self._fast), flat_grads, owner.rate(layout))
        self._fast.update(layout.unflatten(updated))


def _settings(holder, first_order, allow_unused, allow_nograd) -> tuple[bool, bool, bool]:
    """(first_order, allow_unused, allow_nograd): each argument given (True or False), else holder's."""
    given = {"first_order": first_order, "allow_unused": allow_unused, "allow_nograd": allow_nograd}
    return tuple(getattr(holder, name) if value is None else require_bool(name, value)
                 for name, value in given.items())


class MAML(nn.Module):
    """learn2learn.algorithms.MAML(model, lr, first_order=False, allow_unused=None, allow_nograd=False)."""

    def __init__(self, model: nn.Module, lr: float, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False):
        super().__init__()
        self.module = model
        self.lr = lr
        self.first_order = require_bool("first_order", first_order)
        self.allow_nograd = require_bool("allow_nograd", allow_nograd)
        self.allow_unused = (self.allow_nograd if allow_unused is None  # learn2learn's default
                             else require_bool("allow_unused", allow_unused))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        """As learn2learn's: an attribute this MAML does not have is the model's (``maml.features``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "module":
                raise
            return getattr(self.module, name)

    def rate(self, layout: ParamLayout):
        return self.lr

    def clone(self, first_order: bool | None = None, allow_unused: bool | None = None,
              allow_nograd: bool | None = None) -> _Learner:
        """A clone for one task; unset settings are this MAML's (which the arguments do not change).  Its
        weights start as aliases of the model's parameters (views, as learn2learn's copies but without
        the copy): the first inner gradient is then taken with respect to them, so hooks registered on
        the parameters see only the meta-gradient, not each inner gradient too."""
        named = list(self.module.named_parameters())
        refuse_parameters_without_data(named, f"{type(self).__name__}.clone")
        weights = {name: p.view_as(p) for name, p in named}
        modes = {name: m.training for name, m in self.module.named_modules()}
        return _Learner(self, weights, modes, *_settings(self, first_order, allow_unused, allow_nograd))


class MetaSGD(MAML):
    """learn2learn.algorithms.MetaSGD(model, lr=1.0, first_order=False, lrs=None): learned rates in ``lrs``,
    one tensor per parameter (model parameter order), by default one rate per element; as in learn2learn a
    given rate may be any shape that broadcasts to its parameter's (``[1]``: one rate per tensor)."""

    def __init__(self, model: nn.Module, lr: float = 1.0, first_order: bool = False, lrs=None):
        super().__init__(model, lr, first_order)
        refuse_parameters_without_data(list(model.named_parameters()), "MetaSGD")
        params = list(model.parameters())
        lrs = [nn.Parameter(torch.ones_like(p) * lr) for p in params] if lrs is None else list(lrs)
        if len(lrs) != len(params):
            raise ValueError(f"MetaSGD: lrs holds {len(lrs)} rates for the model's {len(params)} parameters; give "
                             "one per parameter, in model order")
        for i, (rate, p) in enumerate(zip(lrs, params)):
            if not isinstance(rate, torch.Tensor):
                raise TypeError(f"MetaSGD: lrs[{i}] must be a tensor, got {type(rate).__name__}")
            if _broadcast_shape(rate.shape, p.shape) != p.shape:
                raise ValueError(f"MetaSGD: lrs[{i}] has shape {list(rate.shape)}, which does not broadcast to its "
                                 f"parameter's shape {list(p.shape)}")
        self.lrs = nn.ParameterList(lrs)

    def rate(self, layout: ParamLayout) -> torch.Tensor:
        return layout.flatten({n: rate.expand_as(p) for (n, p), rate in zip(self.module.named_parameters(), self.lrs)})


def _broadcast_shape(a: torch.Size, b: torch.Size) -> torch.Size | None:
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        return None
