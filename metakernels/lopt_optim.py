"""A learned optimizer as an ordinary torch.optim.Optimizer (obtained with ``lopt.optimizer(params)``).

Each parameter tensor is one normalisation group; its state is the step count and the [4, numel]
momenta / second moment.  ``state_dict`` / ``load_state_dict`` carry that state (the learned rule itself
is saved with ``LearnedOptimizer.save``).

Tensors of up to ``PACK_UP_TO`` elements (biases, norm weights) that share a step count, dtype and
device are stepped in one fused call over their concatenation, each tensor its own segment: the same
result as one call each (bit for bit on the CPU backend, where it is tested), without the ~50-80 us that
every call costs besides its elements: a hundred 768-element tensors step in 2.5 ms instead of 8.5 ms
(hidden=32, two threads, benchmarks/lopt_step_tensors.py); beyond ~16k elements a tensor gains nothing
from the concatenation's copies (benchmarks/RESULTS.md).  The state of a packed tensor is a view of its
pack's output.
Like torch.optim's optimizers, the step writes in place: a contiguous parameter that goes alone and its
state are overwritten by the fused kernel itself (``ops.learned_update_``), without new tensors or a copy
back: at 1e7 elements 0.41x (hidden=4) and 0.66x (hidden=32) the out-of-place step's time under glibc's
default malloc, which maps and faults in every large new tensor (benchmarks/RESULTS.md).

NaN or Inf gradients: ``nan_policy="raise"`` (default) raises FloatingPointError naming the parameter
before anything is updated; ``"skip"`` leaves that parameter and its state unchanged for the step.

Learning rate and weight decay, per parameter group, as PyLO's learned optimizers have them: ``lr``
(default 1.0, the rule as meta-trained) multiplies the learned update, and ``weight_decay`` (default 0)
then shrinks the parameter, decoupled from the rule:

    p' = p - lr * step_mult * d * exp(exp_mult * q);    p'' = (1 - lr * weight_decay) * p'

``lr`` scales ``LoptHyper.step_mult`` for that group's fused calls; a weight decay costs one more pass over
the group's parameters.  ``lr`` is what torch.optim.lr_scheduler's schedulers (and trainers that build one,
such as a linear warmup) set and read; the momenta and the step count, the MLP's inputs, advance whatever
``lr`` is, 0 included.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from . import ops
from .checked_setting import CheckedSetting, one_of
from .ops._checks import warn_float16_second_moment

NAN_POLICIES = ("raise", "skip")
PACK_UP_TO = 1 << 14  # elements: tensors up to this size are stepped together (the module docstring)
_STATE_KEYS = {"step", "lopt_state"}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether no element of t is NaN or +-Inf, from one min/max reduction (NaN propagates to both):
    ~0.1 ms at 1e6 float32 elements against ~1.2 ms for ``torch.isfinite(t).all()``, which writes a bool
    tensor first (a fifth of the learned step's time at hidden=4)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _checked_rate(where: str, value) -> float:
    """value as a float; ValueError unless it is a finite number >= 0 (a Python number or a one-element
    tensor, as schedulers may hold it)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"learned optimizer: {where} must be a finite number >= 0, got {value!r}")
    return number


class _Rates(NamedTuple):
    """A parameter group's lr and weight_decay, checked."""
    lr: float
    weight_decay: float

    @classmethod
    def of(cls, group: dict, where: str) -> "_Rates":
        return cls(*(_checked_rate(f"{where}'s {key}", group[key]) for key in cls._fields))


def _joined(tensors, dim: int = 0) -> torch.Tensor:
    """torch.cat, without the copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


class LearnedOptimizerStep(torch.optim.Optimizer):
    nan_policy = CheckedSetting(one_of("nan_policy", NAN_POLICIES))

    def __init__(self, params, lopt, lr: float = 1.0, weight_decay: float = 0.0, nan_policy: str = "raise"):
        self.nan_policy = nan_policy
        defaults = {"lr": _checked_rate("argument 'lr'", lr),
                    "weight_decay": _checked_rate("argument 'weight_decay'", weight_decay)}
        super().__init__(params, defaults=defaults)
        self.lopt = lopt

    def __getstate__(self):
        """torch.optim's (defaults, state, param groups), plus the learned rule and the NaN policy, which
        a copy (``copy.deepcopy``, ``pickle``, ``torch.save`` of the optimizer) lost before: its step then
        failed on the missing rule."""
        return {**super().__getstate__(), "lopt": self.lopt, "_nan_policy": self.nan_policy}

    def add_param_group(self, param_group):
        """torch.optim's, plus checks that the group's lr and weight_decay are finite numbers >= 0 and its
        parameters are floating point (the group is not added otherwise)."""
        first = sum(len(group["params"]) for group in self.param_groups)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _Rates.of(group, f"parameter group {len(self.param_groups) - 1}")
            for index, p in enumerate(group["params"], start=first):
                if not p.dtype.is_floating_point:
                    raise TypeError(f"learned optimizer: {self._label(index)} has dtype {p.dtype}; expected a "
                                    "floating-point dtype")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _label(self, index: int) -> str:
        """How messages name parameter ``index`` (over all groups): the index, its name where the optimizer
        was given named parameters (torch.optim's ``param_names``), its shape.  Built on the error path only."""
        position = index
        for group in self.param_groups:
            if position < len(group["params"]):
                names = group.get("param_names")
                name = f"{names[position]!r}, " if names else ""
                return f"parameter {index} ({name}shape {list(group['params'][position].shape)})"
            position -= len(group["params"])
        raise IndexError(index)

    def _named_params(self):
        """(index over all groups, parameter, its group's rates), the rates checked (a scheduler may have set
        them)."""
        index = 0
        for number, group in enumerate(self.param_groups):
            rates = _Rates.of(group, f"parameter group {number}")
            for p in group["params"]:
                yield index, p, rates
                index += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weights = {}
        for params, grads, rates in self._plan():
            self._update(params, grads, rates, weights)
        return loss

    def _plan(self):
        """Checks every gradient (layout, dtype, finiteness) and group's rates (nothing is updated before all
        pass) and returns the fused calls to make: (params, their gradients joined, rates), small tensors
        packed by step count, dtype, device and rates."""
        small, calls = {}, []
        for index, p, rates in self._named_params():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"learned optimizer: {self._label(index)} has a sparse gradient, which is not "
                                   "supported")
            if p.grad.dtype != p.dtype:  # possible where the parameter's grad_dtype was set to None
                raise TypeError(f"learned optimizer: the gradient of {self._label(index)} has dtype {p.grad.dtype}, "
                                f"expected the parameter's {p.dtype}; nothing was updated")
            state = self.state.get(p)  # no entry yet for a parameter that has not been stepped
            step = int(state["step"]) if state else 0
            if 0 < p.numel() <= PACK_UP_TO:
                small.setdefault((step, p.dtype, p.device, rates), []).append((index, p))
            elif self._finite(index, p):
                calls.append(([p], p.grad.reshape(-1), rates))
        for (_, _, _, rates), members in small.items():
            grads = _joined([p.grad.reshape(-1) for _, p in members])
            if not _all_finite(grads):  # find (raise) or drop (skip) the offending tensors
                members = [(index, p) for index, p in members if self._finite(index, p)]
                if not members:
                    continue
                grads = _joined([p.grad.reshape(-1) for _, p in members])
            calls.append(([p for _, p in members], grads, rates))
        return calls

    def _finite(self, index, p) -> bool:
        if _all_finite(p.grad):
            return True
        if self.nan_policy == "raise":
            raise FloatingPointError(
                f"learned optimizer: the gradient of {self._label(index)} has NaN or Inf; "
                "nothing was updated (pass nan_policy='skip' to skip such parameters)")
        return False

    def _update(self, params, grads, rates, weights):
        """One fused call for params (same step count, dtype, device and rates; grads: their gradients
        joined), each tensor one segment, written in place: over a lone contiguous parameter and its state
        themselves, else over the concatenation (copied back to the parameters); the states are views of
        the joined state.  The update is scaled by lr, then the weight decay applied."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = 0
                warn_float16_second_moment("learned optimizer", p.dtype, self.lopt.hyper.beta_v)
                state["lopt_state"] = torch.zeros((4, p.numel()), dtype=p.dtype, device=p.device)
        step = int(states[0]["step"])
        if step not in weights:
            weights[step] = self.lopt.flat_weights(step).detach()
        sizes = [p.numel() for p in params]
        in_place = len(params) == 1 and params[0].is_contiguous()
        if in_place:
            flat = params[0].detach().view(-1)
        else:
            flat = _joined([p.detach().reshape(-1) for p in params]).contiguous()
        joined_state = _joined([state["lopt_state"] for state in states], dim=1).contiguous()
        hyper = self.lopt.hyper
        if rates.lr != 1.0:
            hyper = dataclasses.replace(hyper, step_mult=hyper.step_mult * rates.lr)
        ops.learned_update_(flat, grads, joined_state, weights[step].to(params[0].device), hidden=self.lopt.hidden,
                            layers=self.lopt.layers, segments=sizes if len(params) > 1 else None, hyper=hyper)
        if rates.weight_decay:
            flat.mul_(1.0 - rates.lr * rates.weight_decay)
        if not in_place:
            torch._foreach_copy_(params, [p_new.view_as(p) for p, p_new in zip(params, flat.split(sizes))])
        for state, s_new in zip(states, joined_state.split(sizes, dim=1)):
            state["lopt_state"] = s_new
            state["step"] = step + 1

    def load_state_dict(self, state_dict):
        """torch.optim's, refusing another optimizer's state or a state of the wrong size; the groups of a
        state_dict saved before groups had an lr and weight_decay get this optimizer's defaults."""
        params = [p for group in self.param_groups for p in group["params"]]
        for key, entry in state_dict.get("state", {}).items():
            if not isinstance(entry, dict) or set(entry) != _STATE_KEYS:
                got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise ValueError(f"learned optimizer: state of parameter {key} has keys {got}, expected "
                                 f"{sorted(_STATE_KEYS)}: this state_dict is from another optimizer")
            if isinstance(key, int) and 0 <= key < len(params):
                expected = (4, params[key].numel())
                if tuple(entry["lopt_state"].shape) != expected:
                    raise ValueError(f"learned optimizer: state of parameter {key} is {list(entry['lopt_state'].shape)}, "
                                     f"expected {list(expected)} for a parameter of shape {list(params[key].shape)}")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in _Rates._fields:
                group.setdefault(key, self.defaults[key])

