"""The meta-neural network: a learned optimizer whose meta-parameters are a small per-parameter MLP.

    lopt = LearnedOptimizer(hidden=32, layers=2)
    new_params, new_state = lopt.update(params, grads, state, step)   # [T, P] operands, fused kernel
    opt = lopt.optimizer(model.parameters())                          # a torch.optim.Optimizer
    lopt.save("lopt.mk"); lopt = LearnedOptimizer.load("lopt.mk")

The step is :func:`metakernels.ops.learned_update` (features, per-tensor normalisation, MLP and update
in one fused op; see its docstring for the math).  Design after Metz et al. 2022, "Practical tradeoffs
between memory, compute, and performance in learned optimizers" (small_fc_lopt): per-parameter
features (parameter, gradient, momenta at decays 0.5 / 0.9 / 0.99, and those and the gradient scaled
by 1/sqrt of a 0.999 second moment), each normalised by its per-tensor second moment; an MLP of
``layers`` hidden ReLU layers of width ``hidden``; the update ``d * exp(exp_mult * q) * step_mult``.
The step embedding is Metz's: tanh(step / tau - 1) for tau in TIME_SCALES, fed to the first layer
(constant over the parameters of a step, it is folded into that layer's bias before the kernel runs).

``init="adam"`` (default) starts from a normalised-Adam-like rule: two hidden units carry +-m_0.9 r
(the momentum over the RMS gradient, normalised per tensor) to the direction output, the other weights
are small random numbers (so that every unit receives meta-gradients), the magnitude output is 0; the
initial update is then about step_mult * m / sqrt(v) per tensor-RMS.  ``init="random"`` is Metz's
initialisation (fan-in scaled normal weights, zero biases).
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from . import ops
from .checkpoint import CheckpointError, load_checked, save_checked
from .ops._checks import require_int, require_seed, warn_float16_second_moment
from .ops.learned_update import NUM_FEATURES, NUM_STATES, LoptHyper, check_mlp_size

TIME_SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
_ADAM_FEATURE = 7  # m_0.9 * r
_CHECKPOINT_KIND = "metakernels.LearnedOptimizer"


class LearnedOptimizer(nn.Module):
    """The learned optimizer's meta-parameters and its fused update.

    Args:
        hidden: width of the MLP's hidden layers (1..256); 32 is Metz et al.'s, 4 is the smallest
            sensible (memory-bound kernel).
        layers: number of hidden layers (1..4).
        hyper: the fixed hyper-parameters of the step (decays, epsilons, step_mult, exp_mult).
        init: "adam" (a normalised-Adam-like starting rule) or "random".
        seed: seed of the random part of the initialisation (None: torch's global generator).
    """

    def __init__(self, hidden: int = 32, layers: int = 2, hyper: LoptHyper = LoptHyper(), init: str = "adam",
                 seed: int | None = None):
        super().__init__()
        hidden, layers = check_mlp_size("LearnedOptimizer", hidden, layers)
        if init not in ("adam", "random"):
            raise ValueError(f"LearnedOptimizer: init must be 'adam' or 'random', got {init!r}")
        if init == "adam" and hidden < 2:
            raise ValueError("LearnedOptimizer: init='adam' needs hidden >= 2 (two units carry the Adam direction)")
        if not isinstance(hyper, LoptHyper):
            raise TypeError(f"LearnedOptimizer: hyper must be a LoptHyper, got {type(hyper).__name__}")
        seed = require_seed("LearnedOptimizer", seed)
        self.hidden, self.layers, self.hyper, self.init = hidden, layers, hyper, init
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        small = 0.01 if init == "adam" else 1.0

        def normal(*shape, fan_in):
            return nn.Parameter(torch.randn(*shape, generator=gen) * (small / math.sqrt(fan_in)))

        self.w_in = normal(hidden, NUM_FEATURES, fan_in=NUM_FEATURES + len(TIME_SCALES))
        self.w_time = normal(hidden, len(TIME_SCALES), fan_in=NUM_FEATURES + len(TIME_SCALES))
        self.b_in = nn.Parameter(torch.zeros(hidden))
        self.w_hidden = nn.ParameterList([normal(hidden, hidden, fan_in=hidden) for _ in range(layers - 1)])
        self.b_hidden = nn.ParameterList([nn.Parameter(torch.zeros(hidden)) for _ in range(layers - 1)])
        self.w_out = normal(2, hidden, fan_in=hidden)
        self.b_out = nn.Parameter(torch.zeros(2))
        if init == "adam":
            self._init_adam_units()

    @torch.no_grad()
    def _init_adam_units(self):
        """Units 0 and 1 carry relu(x) and relu(-x) of the m_0.9 r feature to d = unit 0 - unit 1."""
        for unit, sign in ((0, 1.0), (1, -1.0)):
            self.w_in[unit].zero_()
            self.w_in[unit, _ADAM_FEATURE] = sign
            self.w_time[unit].zero_()
            for W in self.w_hidden:
                W[unit].zero_()
                W[:, unit].zero_()
                W[unit, unit] = 1.0
        self.w_out[:, :2].zero_()
        self.w_out[0, 0], self.w_out[0, 1] = 1.0, -1.0

    def config(self) -> dict:
        """The constructor's settings as plain JSON values (saved beside the weights by ``save``)."""
        return {"hidden": self.hidden, "layers": self.layers, "init": self.init,
                "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self.hyper).items()}}

    # ------------------------------------------------------------------------------------- the step

    def flat_weights(self, step: int) -> torch.Tensor:
        """The kernel's flat weight vector for (0-based) step ``step``: the time embedding is folded
        into the first layer's bias.  Differentiable with respect to every meta-parameter."""
        step = _check_step("LearnedOptimizer.flat_weights", step)
        scales = torch.tensor(TIME_SCALES, dtype=self.w_time.dtype, device=self.w_time.device)
        time_features = torch.tanh(float(step) / scales - 1.0)
        b_in = self.b_in + self.w_time @ time_features
        parts = [self.w_in.reshape(-1), b_in]
        for W, b in zip(self.w_hidden, self.b_hidden):
            parts += [W.reshape(-1), b]
        parts += [self.w_out.reshape(-1), self.b_out]
        return torch.cat(parts)

    def initial_state(self, params: torch.Tensor) -> torch.Tensor:
        """Zero optimizer state [4, *params.shape] (three momenta and the second moment)."""
        warn_float16_second_moment("LearnedOptimizer", params.dtype, self.hyper.beta_v)
        return params.new_zeros((NUM_STATES, *params.shape))

    def update(self, params: torch.Tensor, grads: torch.Tensor, state: torch.Tensor, step: int, segments=None):
        """One learned step for [T, P] (or [P]) operands: returns (params', state').  ``segments``: the
        sizes of the parameter tensors packed in P (normalisation groups); default one tensor."""
        step = _check_step("LearnedOptimizer.update", step)
        return ops.learned_update(params, grads, state, self.flat_weights(step), hidden=self.hidden,
                                  layers=self.layers, segments=segments, hyper=self.hyper)

    def optimizer(self, params, lr: float = 1.0, weight_decay: float = 0.0,
                  nan_policy: str = "raise") -> "torch.optim.Optimizer":
        """A torch.optim.Optimizer that applies this learned rule (no meta-gradient) to ``params``; per
        parameter group, ``lr`` (what LR schedulers set) multiplies the learned update, 1.0 as meta-trained,
        and ``weight_decay`` then shrinks the parameters by ``1 - lr * weight_decay`` (metakernels/lopt_optim.py)."""
        from .lopt_optim import LearnedOptimizerStep

        return LearnedOptimizerStep(params, self, lr=lr, weight_decay=weight_decay, nan_policy=nan_policy)

    # ----------------------------------------------------------------------------------- save / load

    def save(self, path: str | os.PathLike) -> None:
        """Atomically writes the configuration and the meta-parameters, with a checksum."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        save_checked(path, _CHECKPOINT_KIND, state, meta=self.config())

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None) -> "LearnedOptimizer":
        """The learned optimizer saved at ``path``, in the dtype it was saved in, on the device its weights
        load to (``map_location`` as for ``torch.load``; default: where they were saved from, moved to the
        cpu by ``save``)."""
        meta, state = load_checked(path, _CHECKPOINT_KIND, map_location=map_location)
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{os.fspath(path)}: holds no learned-optimizer weights (expected a dict of tensors)")
        try:
            hyper = LoptHyper(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["hyper"].items()})
            lopt = cls(hidden=meta["hidden"], layers=meta["layers"], hyper=hyper, init=meta["init"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{os.fspath(path)}: invalid learned-optimizer configuration: {exc}") from None
        first = next(iter(state.values()))
        lopt.to(device=first.device, dtype=first.dtype)
        try:
            lopt.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{os.fspath(path)}: weights do not match the configuration: {exc}") from None
        return lopt


def _check_step(where: str, step) -> int:
    return require_int(f"{where}: step", step, 0, note=" (0-based)")
