"""The fused learned-optimizer step: a per-parameter MLP maps gradient features to an update, for T tasks
at once.

Operands: ``params``, ``grads`` ``[T, P]`` (or ``[P]``: one task), ``state`` ``[4, T, P]`` (or ``[4, P]``):
the momenta at three decays and the second moment, zeros at the first step.  ``weights`` is the MLP's
flat weight vector (layout below), shared by all tasks.  ``segments`` lists the sizes of the parameter
tensors packed in P (default: one tensor); features are normalised per task and per tensor.

Math, per element (task t, index i of tensor s), in the style of Metz et al. 2022 ("Practical
tradeoffs between memory, compute, and performance in learned optimizers", the small_fc_lopt):

    m_j' = b_j m_j + (1 - b_j) g            (b = betas, three decays)
    v'   = b_v v + (1 - b_v) g^2,            r = 1 / sqrt(v' + eps_v)
    f    = (p, g, m_1', m_2', m_3', g r, m_1' r, m_2' r, m_3' r)                       (9 features)
    x_k  = f_k / sqrt(mean_{i in s} f_k^2 + eps_n)       (second-moment normalisation per task, tensor)
    a_1  = relu(W_1 x + b_1),  a_{l+1} = relu(W_{l+1} a_l + b_{l+1}),  (d, q) = W_o a_L + b_o
    p'   = p - step_mult * d * exp(exp_mult * q)

Flat weights: W_1 [H, 9], b_1 [H], then (W [H, H], b [H]) for each further hidden layer, then
W_o [2, H], b_o [2] (see :func:`num_weights`).  Step-dependent features (Metz's tanh time embedding)
are constant over the elements of a step, so the caller folds them into b_1.

Gradients flow to params, grads, state and weights.  The fused backward recomputes the forward per
element, back-propagates through the MLP, accumulates the weight gradient as a deterministic reduction
(per-block partials summed in a fixed order, no atomics), and adds the normaliser's own derivative in a
second pass.  When the backward itself is recorded (``create_graph=True``), it is computed by
differentiating the reference instead, so gradients of any order are exact.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from .._autograd import cached_signature
from .. import _backend
from . import _checks
from ._common import acc_dtype

NUM_FEATURES = 9
NUM_STATES = 4
MAX_HIDDEN = 256
MAX_LAYERS = 4
_OP = "learned_update"


@dataclasses.dataclass(frozen=True)
class LoptHyper:
    """The fixed hyper-parameters of the step (Metz et al.'s defaults for step_mult and exp_mult)."""

    betas: tuple[float, float, float] = (0.5, 0.9, 0.99)
    beta_v: float = 0.999
    eps_v: float = 1e-8
    eps_n: float = 1e-12
    step_mult: float = 1e-3
    exp_mult: float = 1e-3

    def __post_init__(self):
        """Each field checked where it is given (a NaN or a decay of 1 would otherwise reach the
        parameters as NaN, or a state that never moves, with no error)."""
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 3:
            raise ValueError(f"LoptHyper: argument 'betas' must be three momentum decays, got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))  # hashable, as the frozen dataclass is
        for index, beta in enumerate(self.betas):
            _checks.require_number("LoptHyper", f"betas[{index}]", beta, low=0.0, high=1.0, high_open=True)
        _checks.require_number("LoptHyper", "beta_v", self.beta_v, low=0.0, high=1.0, high_open=True)
        for name in ("eps_v", "eps_n"):  # 0 divides 0 by 0 where a tensor or its gradients are all zero
            _checks.require_number("LoptHyper", name, getattr(self, name), low=0.0, low_open=True)
        _checks.require_number("LoptHyper", "step_mult", self.step_mult, low=0.0)
        _checks.require_number("LoptHyper", "exp_mult", self.exp_mult)

    def values(self) -> list[float]:
        """In the order of mk::LoptHyper."""
        return [*self.betas, self.beta_v, self.eps_v, self.eps_n, self.step_mult, self.exp_mult]


def num_weights(hidden: int, layers: int) -> int:
    """Length of the flat MLP weight vector."""
    return hidden * NUM_FEATURES + hidden + (layers - 1) * (hidden * hidden + hidden) + 2 * hidden + 2


def check_mlp_size(where: str, hidden, layers) -> tuple[int, int]:
    """(hidden, layers) as ints; ValueError unless they are in [1, MAX_HIDDEN] and [1, MAX_LAYERS]."""
    return (_checks.require_int(f"{where}: argument 'hidden'", hidden, 1, MAX_HIDDEN),
            _checks.require_int(f"{where}: argument 'layers'", layers, 1, MAX_LAYERS))


def split_weights(weights: torch.Tensor, hidden: int, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(W, b)] per layer (hidden layers, then the output layer) as views of the flat vector."""
    shapes = [(hidden, NUM_FEATURES)] + [(hidden, hidden)] * (layers - 1) + [(2, hidden)]
    out, offset = [], 0
    for rows, cols in shapes:
        W = weights[offset:offset + rows * cols].view(rows, cols)
        offset += rows * cols
        out.append((W, weights[offset:offset + rows]))
        offset += rows
    return out


# ----------------------------------------------------------------------------------------- reference

def reference_learned_update(params, grads, state, weights, segments, hidden, layers, hyper: LoptHyper):
    """Plain-PyTorch composition of the step on [T, P] operands: the oracle, the fallback and the recipe
    for gradients of gradients.  Computes in the weights' dtype; returns (params', state') in the
    params' dtype."""
    acc = weights.dtype
    p, g, s = params.to(acc), grads.to(acc), state.to(acc)
    m = [b * s[j] + (1.0 - b) * g for j, b in enumerate(hyper.betas)]
    v = hyper.beta_v * s[3] + (1.0 - hyper.beta_v) * g * g
    r = torch.rsqrt(v + hyper.eps_v)
    feats = torch.stack([p, g, *m, g * r, *(mj * r for mj in m)], dim=-1)  # [T, P, F]
    x = torch.cat([f * torch.rsqrt((f * f).mean(dim=1, keepdim=True) + hyper.eps_n)
                   for f in feats.split(list(segments), dim=1)], dim=1)
    *hidden_layers, (W_o, b_o) = split_weights(weights, hidden, layers)
    for W, b in hidden_layers:
        x = torch.relu(x @ W.T + b)
    out = x @ W_o.T + b_o
    new_params = p - hyper.step_mult * out[..., 0] * torch.exp(hyper.exp_mult * out[..., 1])
    return new_params.to(params.dtype), torch.stack([*m, v]).to(state.dtype)


# ------------------------------------------------------------------------------------ fused kernels

def _kernels(backend: str):
    if backend == "triton":
        from . import learned_update_triton

        return learned_update_triton
    return _backend.extension()


@cached_signature
class _FusedLearnedUpdate(torch.autograd.Function):
    """Inputs (spec, params [T, P], grads [T, P], state [4, T, P], weights [W]); outputs (params', state')."""

    @staticmethod
    def forward(ctx, spec, params, grads, state, weights):
        backend, offsets, hidden, layers, hyper = spec
        p_new, s_new, norms = _kernels(backend).lopt_forward(
            params, grads, state, weights, offsets, hidden, layers, hyper.values())
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.save_for_backward(params, grads, state, weights, norms)
        return p_new, s_new

    @staticmethod
    def backward(ctx, grad_params_out, grad_state_out):
        backend, offsets, hidden, layers, hyper = ctx.spec
        params, grads, state, weights, norms = ctx.saved_tensors
        if torch.is_grad_enabled():
            segments = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
            with torch.enable_grad():
                inputs = (params, grads, state, weights)
                outs = reference_learned_update(*inputs, segments, hidden, layers, hyper)
                pairs = [(o, g) for o, g in zip(outs, (grad_params_out, grad_state_out)) if g is not None]
                wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
                result = [None] * 4
                if pairs and wanted:
                    got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                              [g for _, g in pairs], create_graph=True, allow_unused=True)
                    for i, g in zip(wanted, got):
                        result[i] = g
            return (None, *result)
        if grad_params_out is None and grad_state_out is None:
            return (None,) * 5
        needs = list(ctx.needs_input_grad[1:4])
        d = _kernels(backend).lopt_backward(
            params, grads, state, weights, norms, offsets, hidden, layers, hyper.values(),
            None if grad_params_out is None else grad_params_out.contiguous(),
            None if grad_state_out is None else grad_state_out.contiguous(), needs)
        return (None, d[0], d[1], d[2], d[3] if ctx.needs_input_grad[4] else None)


# ----------------------------------------------------------------------------------- public entry

def _check_segments(segments, P: int) -> list[int]:
    if segments is None:
        return [P]
    try:
        sizes = [int(s) for s in segments]
    except TypeError:
        raise TypeError(f"{_OP}: argument 'segments' must be a sequence of tensor sizes, got {type(segments).__name__}") from None
    if any(s <= 0 for s in sizes) or sum(sizes) != P:
        raise ValueError(f"{_OP}: argument 'segments' must be positive sizes summing to P={P}, got {sizes[:8]}"
                         f"{'...' if len(sizes) > 8 else ''} (sum {sum(sizes)})")
    return sizes


def _operands(params, grads, state, weights, hidden, layers, segments, hyper):
    """Validates the operands of learned_update / learned_update_ (their callers check hidden and layers with
    check_mlp_size); returns them as [T, P] (state [4, T, P]) views, the weights in the accumulation dtype,
    the segment sizes and whether params was [P]."""
    params = _checks.require_tensor(_OP, "params", params)
    grads = _checks.require_tensor(_OP, "grads", grads)
    state = _checks.require_tensor(_OP, "state", state)
    weights = _checks.require_tensor(_OP, "weights", weights)
    _checks.require_like(_OP, "grads", grads, "params", params)
    _checks.require_like(_OP, "state", state, "params", params)
    if params.dim() not in (1, 2):
        raise ValueError(f"{_OP}: argument 'params' must be [P] or [T, P], got shape {_checks.shape_str(params.shape)}")
    if grads.shape != params.shape:
        raise ValueError(f"{_OP}: argument 'grads' must have the shape of params {_checks.shape_str(params.shape)}, "
                         f"got {_checks.shape_str(grads.shape)}")
    expected_state = (NUM_STATES, *params.shape)
    if tuple(state.shape) != expected_state:
        raise ValueError(f"{_OP}: argument 'state' must be {_checks.shape_str(expected_state)} (4 planes: three momenta "
                         f"and the second moment), got {_checks.shape_str(state.shape)}")
    if weights.dim() != 1 or weights.numel() != num_weights(hidden, layers):
        raise ValueError(f"{_OP}: argument 'weights' must be [{num_weights(hidden, layers)}] for hidden={hidden}, "
                         f"layers={layers}, got {_checks.shape_str(weights.shape)}")
    if weights.dtype not in (torch.float32, torch.float64) or weights.device != params.device:
        raise TypeError(f"{_OP}: argument 'weights' must be float32 or float64 on {params.device}, "
                        f"got {weights.dtype} on {weights.device}")
    if not isinstance(hyper, LoptHyper):
        raise TypeError(f"{_OP}: argument 'hyper' must be a LoptHyper, got {type(hyper).__name__}")
    single = params.dim() == 1
    if single:
        params, grads, state = params.unsqueeze(0), grads.unsqueeze(0), state.unsqueeze(1)
    sizes = _check_segments(segments, params.shape[1])
    return params, grads, state, weights.to(acc_dtype(params.dtype)), sizes, single


def learned_update(params: torch.Tensor, grads: torch.Tensor, state: torch.Tensor, weights: torch.Tensor, *,
                   hidden: int, layers: int, segments=None, hyper: LoptHyper = LoptHyper()):
    """One learned-optimizer step for every task: returns ``(params', state')``; see the module
    docstring for the math and shapes.  ``weights`` is float32 or float64; it is cast to the
    accumulation dtype (float64 for float64 params, else float32)."""
    hidden, layers = check_mlp_size(_OP, hidden, layers)
    params, grads, state, weights, sizes, single = _operands(params, grads, state, weights, hidden, layers,
                                                             segments, hyper)
    backend = _backend.select(params.device, _OP)
    if backend == "reference" or params.numel() == 0:
        p_new, s_new = reference_learned_update(params, grads, state, weights, sizes, hidden, layers, hyper)
    else:
        spec = (backend, _offsets(sizes), hidden, layers, hyper)
        p_new, s_new = _FusedLearnedUpdate.apply(spec, params.contiguous(), grads.contiguous(), state.contiguous(),
                                                 weights.contiguous())
    if single:
        return p_new.squeeze(0), s_new.squeeze(1)
    return p_new, s_new


@torch.no_grad()
def _reference_in_place(params, grads, state, weights, sizes, hidden, layers, hyper):
    p_new, s_new = reference_learned_update(params, grads, state, weights, sizes, hidden, layers, hyper)
    params.copy_(p_new)
    state.copy_(s_new)


def learned_update_(params: torch.Tensor, grads: torch.Tensor, state: torch.Tensor, weights: torch.Tensor, *,
                    hidden: int, layers: int, segments=None, hyper: LoptHyper = LoptHyper()):
    """:func:`learned_update` written over ``params`` and ``state``, which it returns: an optimizer's step
    without two new tensors and the copy back (the fused kernels read each element before they write it).
    Not differentiable: raises where autograd would record it (use :func:`learned_update` for
    meta-gradients).  ``params`` and ``state`` must be contiguous and share no memory with each other,
    ``grads`` or ``weights``."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (params, grads, state, weights)):
        raise RuntimeError(f"{_OP}_: writes params and state in place and records nothing for autograd; an input "
                           f"requires grad: call {_OP} for a meta-gradient, or run under torch.no_grad()")
    hidden, layers = check_mlp_size(_OP, hidden, layers)
    p, g, s, w, sizes, _ = _operands(params, grads, state, weights, hidden, layers, segments, hyper)
    for name, t in (("params", p), ("state", s)):
        if not t.is_contiguous():
            raise ValueError(f"{_OP}_: argument '{name}' must be contiguous (it is written in place), got strides "
                             f"{tuple(t.stride())} for shape {_checks.shape_str(t.shape)}")
    named = {"params": p, "grads": g, "state": s, "weights": w}
    for read, written in (("params", "state"), ("grads", "params"), ("grads", "state"), ("weights", "params"),
                          ("weights", "state")):
        if _shares_memory(named[read], named[written]):
            raise ValueError(f"{_OP}_: arguments '{read}' and '{written}' share memory; '{written}' is written in "
                             "place")
    backend = _backend.select(p.device, _OP)
    if backend == "reference" or p.numel() == 0:
        _reference_in_place(p, g, s, w, sizes, hidden, layers, hyper)
    else:
        _kernels(backend).lopt_forward(p, g.contiguous(), s, w.contiguous(), _offsets(sizes), hidden, layers,
                                       hyper.values(), True)
        for t in (params, state):  # as torch's own in-place ops do: a graph that saved them now refuses to run
            torch.autograd.graph.increment_version(t)
    return params, state


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes a and b can address intersect (same storage, overlapping extents)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def extent(t):
        start = t.storage_offset() * t.element_size()
        last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) * t.element_size()
        return start, start + last + t.element_size()

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def _offsets(sizes: list[int]) -> list[int]:
    return [0, *itertools.accumulate(sizes)]


def flops_per_element(hidden: int, layers: int) -> dict[str, int]:
    """FLOPs per parameter element of the MLP (2 per multiply-add): forward, and backward (input and
    weight gradients).  The fused backward also recomputes the forward."""
    macs = hidden * NUM_FEATURES + (layers - 1) * hidden * hidden + 2 * hidden
    return {"forward": 2 * macs, "backward": 4 * macs}

