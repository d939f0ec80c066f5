"""What every torch.autograd.Function of the package shares."""
from __future__ import annotations

import functools
import inspect

import torch


def cached_signature(function_cls):
    """Class decorator: stores ``forward``'s signature on it as ``__signature__``, which
    ``inspect.signature`` returns as it is.  ``Function.apply`` binds every call's arguments to
    ``forward``'s signature (Functions with a ``setup_context``, as vmap needs), and deriving the
    signature anew took ~70 us a call: ~10 ms of a meta-step's ~400 calls."""
    forward = function_cls.forward
    forward.__signature__ = inspect.signature(forward)
    return function_cls


@cached_signature
class _NoThirdDerivative(torch.autograd.Function):
    """Passes a double backward's outputs through (as views) with an edge to each of its differentiable
    inputs; differentiating through it raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name, n_inputs, *tensors):
        return tuple(None if t is None else t.view_as(t) for t in tensors[n_inputs:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"metakernels: {ctx.name} is twice differentiable, not three times (its double "
                           "backward has no derivative of its own)")


def twice_differentiable(op: str):
    """Decorator for the ``backward`` of a Function that computes the double backward of ``op`` (its public
    name, for the error) without recording it.

    It runs without grad mode, as torch's ``once_differentiable``; where grad mode is on and an input or
    saved tensor requires grad (a third derivative is being recorded), the outputs are tied to those
    tensors through a node that raises when differentiated.  torch's ``once_differentiable`` ties its
    error node to detached copies instead, which autograd prunes when differentiating with respect to the
    real inputs: a third derivative would leave that path out without a word."""
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            tied = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
            return _NoThirdDerivative.apply(op, len(tied), *tied, *outputs) if tied else outputs

        return wrapper

    return decorate
