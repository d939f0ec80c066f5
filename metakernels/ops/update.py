"""Fused, differentiable, task-batched inner-loop updates: SGD (plain and Meta-SGD), momentum, Adam.

Every tensor operand is ``[T, P]`` (one row per task, P flattened parameters) or ``[P]`` (shared by all
T tasks); the outputs are ``[T, P]`` when any operand is, else ``[P]``.  One launch updates every task
and every parameter.  The learning rate is a number, a 0-d tensor, a ``[P]`` tensor (Meta-SGD's learned
per-parameter rates shared by the tasks) or a ``[T, P]`` tensor (per task).

Gradients flow to every tensor operand.  The cotangent of a ``[P]`` operand used by T tasks is the sum
over tasks, computed in task order inside the backward kernel (deterministic, no atomics) and accumulated in
double whatever the dtype (csrc/update_kernels.h says why).  The first
backward is a fused kernel; when the backward itself is recorded (``create_graph=True``) it is computed
by differentiating the reference formulas instead, so gradients of any order are exact.  SGD and
momentum with a number as their rate are linear and keep nothing for their backward, which is then a
few tensor ops (deterministic sums over tasks): an unrolled inner loop does not hold its K inner
gradients.

Math (per element; c1 = 1 - beta1**step, c2 = 1 - beta2**step):
    sgd:       p' = p - lr * g
    momentum:  b' = momentum * b + g;                 p' = p - lr * b'
    adam:      m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g**2
               p' = p - lr * (m' / c1) / (sqrt(v' / c2) + eps)
Adam's backward treats d sqrt(v')/dv' as 0 where v' = 0 (only when g = v = 0), so it stays finite where
higher's and TorchOpt's differentiable Adam return NaN.
"""
from __future__ import annotations

import enum

import torch

from .. import _backend
from .._autograd import cached_signature
from . import _checks


class UpdateKind(enum.IntEnum):
    """Numeric codes shared with csrc/update_math.h."""

    SGD = 0
    MOMENTUM = 1
    ADAM = 2


_STATE_NAMES = {UpdateKind.SGD: (), UpdateKind.MOMENTUM: ("buf",), UpdateKind.ADAM: ("m", "v")}
_OP_NAMES = {UpdateKind.SGD: "sgd_update", UpdateKind.MOMENTUM: "momentum_update", UpdateKind.ADAM: "adam_update"}


def _hyper(lr: float = 0.0, momentum: float = 0.0, beta1: float = 0.0, beta2: float = 0.0, eps: float = 0.0,
           step: int = 1) -> list[float]:
    """The 7 hyper-parameters of every kernel, in the order of mk::UpdateHyper."""
    return [lr, momentum, beta1, beta2, eps, 1.0 - beta1**step, 1.0 - beta2**step]


# ----------------------------------------------------------------------------------------- reference

def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) whose derivative is 0 (not inf) at x = 0; twice differentiable everywhere else, and NaN
    stays NaN (only an exact zero is special-cased)."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), torch.where(zero, torch.ones_like(x), x).sqrt())


def reference_update(kind: UpdateKind, params, grads, states, lr, hyper, out_shape) -> tuple[torch.Tensor, ...]:
    """The plain-PyTorch composition of the update: the oracle, the fallback and the recipe for
    gradients of gradients.  ``lr`` is a tensor or None (then ``hyper[0]`` is used)."""
    rate = hyper[0] if lr is None else lr
    momentum, beta1, beta2, eps, c1, c2 = hyper[1:]
    if kind == UpdateKind.SGD:
        outs = (params - rate * grads,)
    elif kind == UpdateKind.MOMENTUM:
        buf = momentum * states[0] + grads
        outs = (params - rate * buf, buf)
    else:
        m = beta1 * states[0] + (1.0 - beta1) * grads
        v = beta2 * states[1] + (1.0 - beta2) * grads * grads
        outs = (params - rate * (m / c1) / (_safe_sqrt(v / c2) + eps), m, v)
    return tuple(o if o.shape == out_shape else o.expand(out_shape).contiguous() for o in outs)


# ------------------------------------------------------------------------------------ fused kernels

def _kernels(backend: str):
    """The module implementing update_forward / update_backward for a compiled backend."""
    if backend == "triton":
        from . import update_triton

        return update_triton
    return _backend.extension()


@cached_signature
class _FusedUpdate(torch.autograd.Function):
    """Autograd wiring of the fused kernels.  Inputs: (spec, params, grads, state0, state1, lr), the
    absent ones None; outputs: (params', *new states)."""

    @staticmethod
    def forward(ctx, spec, params, grads, state0, state1, lr):
        kind, backend, hyper, out_shape = spec
        states = [s.contiguous() for s in (state0, state1) if s is not None]
        lr_c = None if lr is None else lr.contiguous()
        outs = _kernels(backend).update_forward(int(kind), params.contiguous(), grads.contiguous(), states, lr_c, hyper)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.operand_dims = (params.dim(), grads.dim(), None if state0 is None else state0.dim())
        ctx.linear = kind != UpdateKind.ADAM and lr is None
        if not ctx.linear:  # (linear: nothing saved, so an unrolled inner loop does not hold its K inner gradients)
            ctx.save_for_backward(params, grads, state0, state1, lr)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        if ctx.linear:
            return (None,) + _linear_backward(ctx, grad_outs[0], grad_outs[1] if len(grad_outs) > 1 else None)
        if torch.is_grad_enabled():
            return (None,) + _differentiable_backward(ctx, grad_outs)
        kind, backend, hyper, out_shape = ctx.spec
        params, grads, state0, state1, lr = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[1:])
        batched_out = len(out_shape) == 2

        def rows(t):  # [P] -> [1, P] when the outputs were [P], so that the kernel sees one task
            return t if t is None or batched_out else t.unsqueeze(0)

        def contiguous_rows(t):
            return None if t is None else rows(t).contiguous()

        gp, *g_states = (contiguous_rows(g) for g in grad_outs)
        states = [contiguous_rows(s) for s in (state0, state1) if s is not None]
        T = out_shape[0] if batched_out else 1
        param_batched = ctx.operand_dims[0] == 2 or not batched_out
        d = _kernels(backend).update_backward(
            int(kind), T, param_batched, contiguous_rows(grads), states, contiguous_rows(lr), gp, g_states, needs, hyper
        )
        d_params = d[0] if not param_batched else (gp if needs[0] else None)
        result = [d_params, *d[1:]]
        if not batched_out:
            result = [None if r is None else r.squeeze(0) for r in result]
        return (None, *result)


def _linear_backward(ctx, gp, g_buf):
    """SGD and momentum with a number as their rate are linear (b' = m b + g, p' = p - lr b'; SGD: b' = g
    and no b), so their cotangents need none of the inputs: d p = gp, d g = d b' = g_buf - lr gp and
    d b = m d b', each summed over the tasks where that operand was [P].  Tensor ops, so differentiable
    again as they stand."""
    _, need_params, need_grads, need_buf = ctx.needs_input_grad[:4]
    hyper = ctx.spec[2]
    d_new_buf = gp * -hyper[0] if gp is not None else None
    if g_buf is not None:
        d_new_buf = g_buf if d_new_buf is None else d_new_buf + g_buf

    def onto(t, operand_dim):
        return None if t is None else (t.sum(0) if operand_dim < t.dim() else t)

    d_params = onto(gp, ctx.operand_dims[0]) if need_params else None
    d_grads = onto(d_new_buf, ctx.operand_dims[1]) if need_grads else None
    d_buf = onto(d_new_buf, ctx.operand_dims[2]) * hyper[1] if need_buf and d_new_buf is not None else None
    return d_params, d_grads, d_buf, None, None


def _differentiable_backward(ctx, grad_outs):
    """Vector-Jacobian product of the reference formulas, recorded so that it can be differentiated
    again (used when the backward runs under create_graph=True)."""
    kind, _, hyper, out_shape = ctx.spec
    inputs = ctx.saved_tensors
    params, grads, state0, state1, lr = inputs
    states = [s for s in (state0, state1) if s is not None]
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
    with torch.enable_grad():
        outs = reference_update(kind, params, grads, states, lr, hyper, out_shape)
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None]
        if not pairs or not wanted:
            return (None,) * 5
        grads_wanted = torch.autograd.grad(
            [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )
    result = [None] * 5
    for i, g in zip(wanted, grads_wanted):
        result[i] = g
    return tuple(result)


# ----------------------------------------------------------------------------------- public entry

def _update(kind: UpdateKind, params, grads, states: tuple, lr, hyper_kwargs: dict) -> tuple[torch.Tensor, ...]:
    op = _OP_NAMES[kind]
    params = _checks.require_tensor(op, "params", params)
    named = [("params", params), ("grads", _checks.require_tensor(op, "grads", grads))]
    for name, state in zip(_STATE_NAMES[kind], states):
        named.append((name, _checks.require_tensor(op, name, state)))
    lr_tensor, lr_value = _check_lr(op, lr, params)
    if lr_tensor is not None and lr_tensor.dim() > 0:
        named.append(("lr", lr_tensor))
    for name, t in named[1:]:
        _checks.require_like(op, name, t, "params", params)
    T, P = _checks.task_operand_shape(op, named)
    if lr_tensor is not None and lr_tensor.dim() == 0:
        lr_tensor = lr_tensor.reshape(1).expand(P)  # its cotangent is then the sum over all elements
    out_shape = torch.Size([T, P] if T is not None else [P])
    hyper = _hyper(lr=lr_value, **hyper_kwargs)
    state_list = [t for _, t in named[2:2 + len(states)]]
    backend = _backend.select(params.device, op)
    if backend == "reference" or out_shape.numel() == 0:
        return reference_update(kind, params, named[1][1], state_list, lr_tensor, hyper, out_shape)
    padded = state_list + [None] * (2 - len(state_list))
    spec = (kind, backend, hyper, out_shape)
    return _FusedUpdate.apply(spec, params, named[1][1], padded[0], padded[1], lr_tensor)


def _check_lr(op: str, lr, params: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(lr tensor or None, lr number or 0.0).  Shapes are checked with the other operands."""
    if isinstance(lr, torch.Tensor):
        _checks.require_tensor(op, "lr", lr)
        _checks.require_like(op, "lr", lr, "params", params)
        if lr.dim() > 2:
            raise ValueError(
                f"{op}: argument 'lr' must be a number, a 0-d tensor, [P] or [T, P], got shape {_checks.shape_str(lr.shape)}"
            )
        return lr, 0.0
    return None, _checks.require_number(op, "lr", lr)


def sgd_update(params: torch.Tensor, grads: torch.Tensor, lr) -> torch.Tensor:
    """``params - lr * grads`` for every task at once; see the module docstring for shapes."""
    return _update(UpdateKind.SGD, params, grads, (), lr, {})[0]


def momentum_update(params: torch.Tensor, grads: torch.Tensor, buf: torch.Tensor, lr, momentum: float):
    """Heavy-ball momentum: returns ``(params', buf')``, ``buf' = momentum*buf + grads``,
    ``params' = params - lr*buf'``."""
    momentum = _checks.require_number("momentum_update", "momentum", momentum, low=0.0)
    return _update(UpdateKind.MOMENTUM, params, grads, (buf,), lr, {"momentum": momentum})


def adam_update(params: torch.Tensor, grads: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr,
                beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
    """Adam with bias correction at 1-based ``step``: returns ``(params', m', v')``."""
    op = "adam_update"
    step = _checks.require_int(f"{op}: argument 'step'", step, 1, note=" (the 1-based step count)")
    hyper = {
        "beta1": _checks.require_number(op, "beta1", beta1, low=0.0, high=1.0, high_open=True),
        "beta2": _checks.require_number(op, "beta2", beta2, low=0.0, high=1.0, high_open=True),
        "eps": _checks.require_number(op, "eps", eps, low=0.0),
        "step": step,
    }
    return _update(UpdateKind.ADAM, params, grads, (m, v), lr, hyper)
