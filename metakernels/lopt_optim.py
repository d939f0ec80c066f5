"""A learned optimizer as an ordinary torch.optim.Optimizer (obtained with ``lopt.optimizer(params)``).

Each parameter tensor is one normalisation group and one fused-kernel call per step; its state is the
step count and the [4, numel] momenta / second moment.  ``state_dict`` / ``load_state_dict`` carry that
state (the learned rule itself is saved with ``LearnedOptimizer.save``).

NaN or Inf gradients: ``nan_policy="raise"`` (default) raises FloatingPointError naming the parameter
before anything is updated; ``"skip"`` leaves that parameter and its state unchanged for the step.
"""
from __future__ import annotations

import torch

from . import ops

NAN_POLICIES = ("raise", "skip")
_STATE_KEYS = {"step", "lopt_state"}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether no element of t is NaN or +-Inf, from one min/max reduction (NaN propagates to both):
    ~0.1 ms at 1e6 float32 elements against ~1.2 ms for ``torch.isfinite(t).all()``, which writes a bool
    tensor first (a fifth of the learned step's time at hidden=4)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class LearnedOptimizerStep(torch.optim.Optimizer):
    def __init__(self, params, lopt, nan_policy: str = "raise"):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        super().__init__(params, defaults={})
        self.lopt = lopt
        self.nan_policy = nan_policy

    def _named_params(self):
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield index, p
                index += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []
        for index, p in self._named_params():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"learned optimizer: parameter {index} has a sparse gradient, which is not supported")
            if not _all_finite(p.grad):
                if self.nan_policy == "raise":
                    raise FloatingPointError(
                        f"learned optimizer: the gradient of parameter {index} (shape {list(p.shape)}) has NaN or Inf; "
                        "nothing was updated (pass nan_policy='skip' to skip such parameters)")
                continue
            todo.append(p)
        weights = {}
        for p in todo:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["lopt_state"] = torch.zeros((4, p.numel()), dtype=p.dtype, device=p.device)
            step = int(state["step"])
            if step not in weights:
                weights[step] = self.lopt.flat_weights(step).detach()
            new_p, new_state = ops.learned_update(
                p.detach().reshape(-1), p.grad.reshape(-1), state["lopt_state"], weights[step].to(p.device),
                hidden=self.lopt.hidden, layers=self.lopt.layers, hyper=self.lopt.hyper)
            p.copy_(new_p.view_as(p))
            state["lopt_state"] = new_state
            state["step"] = step + 1
        return loss

    def load_state_dict(self, state_dict):
        params = [p for _, p in self._named_params()]
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

