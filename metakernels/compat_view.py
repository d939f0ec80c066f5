"""A learn2learn clone's modules, seen through :mod:`metakernels.compat`'s clone.

learn2learn's clone is a copy of the model: ``learner.module`` is that copy, attributes the clone does
not have are the copy's (``learner.features(x)``, ``learner.head.weight``, ``learner.config``), and
``learner.eval()`` switches the copy, not the model.  metakernels' clone holds no copy, only the task's
weights by name; a :class:`ModuleView` gives the same access with them:

- calling the view of a module (the model, or a submodule such as ``learner.features``) runs its
  forward with the clone's weights (``torch.func.functional_call``), as does calling one of its methods
  (``learner.encode(x)``);
- a parameter read through a view is the clone's weight; any other attribute is the module's own;
- the forward runs in the clone's train/eval modes: those of the model when the clone was made, then
  as ``learner.train()`` / ``learner.eval()`` (or ``learner.features.eval()``) set them;
- a second-order clone's forward runs torch's scaled_dot_product_attention on its math backend, which
  its ``adapt`` can differentiate twice (:mod:`metakernels.attention_backend`).

Tied parameters are found by identity, so ``learner.lm_head(h)`` uses the weight tied to the embedding.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from .attention_backend import twice_differentiable_attention


class _MethodCall(nn.Module):
    """A module whose forward is ``method`` of ``inner``, so that functional_call can run it."""

    def __init__(self, inner: nn.Module, method: str):
        super().__init__()
        self.inner, self.method = inner, method

    def forward(self, *args, **kwargs):
        return getattr(self.inner, self.method)(*args, **kwargs)


class ModuleView:
    """``module`` of ``root`` with a clone's weights (``weights``: root parameter name -> tensor, a dict the
    clone updates in place), train/eval modes (``modes``: root module name -> training flag), and whether
    the clone adapts to second order."""

    def __init__(self, root: nn.Module, module: nn.Module, weights: dict[str, torch.Tensor], modes: dict[str, bool],
                 second_order: bool):
        self._root, self._module, self._weights, self._modes = root, module, weights, modes
        self._second_order = second_order

    def _weights_of(self, module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        """``module``'s parameters by every name they have in it (tied ones too), as the clone's weights."""
        root_name = {id(p): name for name, p in self._root.named_parameters()}
        return {prefix + alias: self._weights[root_name[id(p)]]
                for alias, p in module.named_parameters(remove_duplicate=False)}

    @contextlib.contextmanager
    def _as_the_clone_runs(self):
        """The root's modules switched to the clone's train/eval modes (and back afterwards), and attention
        twice differentiable for a second-order clone."""
        switched = [m for name, m in self._root.named_modules() if m.training != self._modes.get(name, m.training)]
        for m in switched:
            m.training = not m.training
        try:
            with twice_differentiable_attention(self._second_order and torch.is_grad_enabled()):
                yield
        finally:
            for m in switched:
                m.training = not m.training

    def __call__(self, *args, **kwargs):
        with self._as_the_clone_runs():
            return functional_call(self._module, self._weights_of(self._module), args, kwargs)

    def _call_method(self, method: str, *args, **kwargs):
        with self._as_the_clone_runs():
            return functional_call(_MethodCall(self._module, method), self._weights_of(self._module, "inner."),
                                   args, kwargs)

    def train(self, mode: bool = True) -> "ModuleView":
        """Sets the clone's mode of this module and of those below it (the model's stay as they are)."""
        ids = {id(m) for m in self._module.modules()}
        for name, m in self._root.named_modules():
            if id(m) in ids:
                self._modes[name] = bool(mode)
        return self

    def eval(self) -> "ModuleView":
        return self.train(False)

    @property
    def training(self) -> bool:
        """The clone's mode of this module."""
        return next(self._modes[name] for name, m in self._root.named_modules() if m is self._module)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, weight) for this module's parameters, the clone's weights."""
        weights = self._weights_of(self._module)
        for name, _ in self._module.named_parameters(recurse=recurse, remove_duplicate=remove_duplicate):
            yield (f"{prefix}.{name}" if prefix else name), weights[name]

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        for _, weight in self.named_parameters(recurse=recurse):
            yield weight

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_root", "_module", "_weights", "_modes", "_second_order"):
            raise AttributeError(name)
        if hasattr(nn.Module, name) and name != "forward":
            raise AttributeError(f"{name!r} is an nn.Module method, which would act on the shared model, not on this "
                                 f"clone's weights (metakernels' clone holds the task's weights, not a copy of the "
                                 f"model); use maml.module.{name} for the shared model")
        value = getattr(self._module, name)
        if isinstance(value, nn.Parameter):
            return self._weights_of(self._module)[name]
        if inspect.ismethod(value) and value.__self__ is self._module:
            return functools.partial(self._call_method, name)
        return self._viewed(value)

    def _viewed(self, value):
        """A module as a view of it with the clone's weights; anything else as it is."""
        if isinstance(value, nn.Module):
            return ModuleView(self._root, value, self._weights, self._modes, self._second_order)
        return value

    def __getitem__(self, index):
        """A container's member (``learner.layers[0]``, ``learner.blocks["attn"]``), as a view."""
        return self._viewed(self._module[index])

    def __iter__(self):
        return (self._viewed(member) for member in self._module)

    def __len__(self) -> int:
        return len(self._module)

    def __repr__(self) -> str:
        return f"ModuleView({self._module!r})"
