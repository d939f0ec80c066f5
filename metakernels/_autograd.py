"""What every torch.autograd.Function of the package shares."""
from __future__ import annotations

import functools
import inspect

import torch
from torch._C import _functorch
from torch._functorch.autograd_function import VmapInfo
from torch._functorch.pyfunctorch import TransformType, retrieve_current_functorch_interpreter


class _Positional:
    """What ``Signature.bind`` returns for a call that passes every parameter positionally."""

    __slots__ = ("args",)
    kwargs: dict = {}

    def __init__(self, args):
        self.args = args

    def apply_defaults(self):
        pass


class _ForwardSignature(inspect.Signature):
    """``forward``'s signature, whose ``bind`` of a call passing every parameter positionally (what the
    package's ops do) skips inspect's general binding: ~15-20 us of each of ~400 calls of a meta-step."""

    __slots__ = ("_positional_count",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in self.parameters.values())
        self._positional_count = len(self.parameters) if plain else -1

    def bind(self, *args, **kwargs):
        if not kwargs and len(args) == self._positional_count:
            return _Positional(args)
        return super().bind(*args, **kwargs)


def cached_signature(function_cls):
    """Class decorator: stores ``forward``'s signature on it as ``__signature__``, which
    ``inspect.signature`` returns as it is.  ``Function.apply`` binds every call's arguments to
    ``forward``'s signature (Functions with a ``setup_context``, as vmap needs): deriving the signature
    anew took ~70 us a call, and the general binding ~15-20 us more (see _ForwardSignature)."""
    forward = function_cls.forward
    forward.__signature__ = _ForwardSignature.from_callable(forward)
    return function_cls


@cached_signature
class _RaiseWhenDifferentiated(torch.autograd.Function):
    """Passes tensors through (as views) with an edge to each of ``n_inputs`` tensors before them;
    differentiating through it raises ``message``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, n_inputs, *tensors):
        return tuple(None if t is None else t.view_as(t) for t in tensors[n_inputs:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def raise_when_differentiated(message: str, inputs, outputs):
    """``outputs`` (a backward's, computed without a graph) tied to those of ``inputs`` that require grad
    through a node that raises ``message`` when differentiated; as they are where none does."""
    tied = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return _RaiseWhenDifferentiated.apply(message, len(tied), *tied, *outputs) if tied else outputs


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
            return raise_when_differentiated(f"metakernels: {op} is twice differentiable, not three times (its "
                                             "double backward has no derivative of its own)",
                                             (*ctx.saved_tensors, *grads), outputs)

        return wrapper

    return decorate


def apply(function, *args):
    """``function.apply(*args)`` for a Function with a ``vmap`` staticmethod, calling that rule directly when
    the only functorch transform active is one ``torch.vmap`` (the inner loop's vmap over tasks).

    functorch reaches the rule through a Python higher-order-operator dispatch that flattens and rebuilds
    the operands and outputs as pytrees and binds the arguments twice: ~150-200 us a call, for ~110 calls
    of a meta-step's forward passes.  The direct path does what that dispatch does for this case: unwrap
    the operands batched at the vmap's level, run the rule one level down, wrap the outputs.  The rule runs
    without ``__torch_function__`` handling: a torch function mode of the caller (such as the inner loop's
    TaskLinearMode) would otherwise see each of the op's internal reshapes and products (~1.4 us each).
    Any other transform stack (nested vmaps, grad, jvp) goes through functorch itself."""
    stack = _functorch.get_interpreter_stack()
    if stack is None or len(stack) != 1 or stack[0].key() != TransformType.Vmap:
        return function.apply(*args)
    interpreter = retrieve_current_functorch_interpreter()
    level = interpreter.level()
    plain, in_dims = [], []
    for arg in args:
        unwrapped, dim = _functorch._unwrap_batched(arg, level) if isinstance(arg, torch.Tensor) else (arg, None)
        plain.append(unwrapped)
        in_dims.append(dim)
    if all(dim is None for dim in in_dims):
        return function.apply(*args)
    with interpreter.lower(), torch._C.DisableTorchFunction():  # the rule's internals, not the caller's modes
        outputs, out_dims = function.vmap(VmapInfo(interpreter.batch_size(), interpreter.randomness()),
                                          tuple(in_dims), *plain)

    def wrap(output, dim):
        return output if output is None or dim is None else _functorch._add_batch_dim(output, dim, level)

    if isinstance(outputs, tuple):
        return tuple(wrap(output, dim) for output, dim in zip(outputs, out_dims))
    return wrap(outputs, out_dims)
