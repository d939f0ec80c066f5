"""Evolution-strategies estimates of a learned optimizer's meta-gradient: no backpropagation through
the unroll, so no graph is kept, and the meta-loss need not be differentiable.

    es = ESEstimator(trainer, sigma=0.01, pairs=8)                 # antithetic ES
    es = ESEstimator(trainer, sigma=0.01, pairs=8, persistent=True) # persistent ES, truncated unrolls
    result = es.estimate(loss_fn, support, steps=K)                 # .grad of lopt's parameters += estimate
    meta_opt.step()

With phi the meta-parameters (those of ``lopt.parameters()`` that require grad, as one vector of D
numbers; a frozen one is neither perturbed nor given a gradient, as backpropagation would leave it), L(phi) the
meta-loss of :meth:`LearnedOptimizerTrainer.unroll` and eps_1 .. eps_N ~ N(0, sigma^2 I_D):

    antithetic ES:  g = 1 / (2 N sigma^2) sum_i (L(phi + eps_i) - L(phi - eps_i)) eps_i
                    (Salimans et al. 2017), the gradient of the Gaussian-smoothed meta-loss,
                    E[g] = grad E_eps[L(phi + eps)] -> grad L(phi) as sigma -> 0.

    persistent ES:  each of the 2N particles (phi +- eps_i) keeps its own inner state from one
                    truncated unroll to the next, a new eps_i is drawn per truncation and accumulated,
                    xi_i += eps_i, and g = 1 / (2 N sigma^2) sum_i (L_i^+ - L_i^-) xi_i (Vicol et al.
                    2021, "Unbiased gradient estimation in unrolled computation graphs with persistent
                    evolution strategies").  Summed over the truncations of one inner problem, it is an
                    unbiased estimate of the smoothed gradient of the whole unroll's summed meta-loss,
                    which truncated backpropagation (and truncated plain ES) is not.

Each particle is one unroll of all T tasks at once (``track_meta_gradient=False``: inner gradients
only), and every unroll of an estimate starts from the random-number state and model buffers the
estimate found: the particles draw the same dropout masks (common random numbers, so that L(phi + eps_i)
- L(phi - eps_i) measures the perturbation, not two draws of the masks) and see the same running
statistics.  Afterwards both are as one unroll left them (the centre's, or persistent ES's last
particle's).  The meta-parameters are set to phi +- eps for that unroll and restored bit for bit
afterwards, also when an unroll raises.  The estimate reaches ``.grad`` through autograd's own accumulation
(``torch.autograd.backward`` on the parameters), so hooks on the parameters (``register_hook``, such as
a clipping hook, and ``register_post_accumulate_grad_hook``) see it as they see a ``backward()``'s.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import forward_state
from .checked_setting import CheckedSetting
from .eager_under_compile import eager_under_compile
from .lopt_training import LearnedOptimizerTrainer, UnrollState
from .ops._checks import require_bool, require_int, require_seed
from .tasks import task_count


@dataclasses.dataclass
class ESResult:
    meta_loss: torch.Tensor       # 0-d: antithetic, the meta-loss at phi; persistent, the mean over the particles
    gradient: list[torch.Tensor]  # the estimate, one tensor per meta-parameter that requires grad (also added
                                  # to .grad, through the parameters' hooks)
    state: UnrollState | None     # antithetic: the end of the unroll at phi (to continue); persistent: None


def _positive_sigma(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"sigma must be a positive finite number, got {value!r}")
    return float(value)


class ESEstimator:
    """Antithetic or persistent evolution-strategies meta-gradients for ``trainer.lopt``.  ``sigma``,
    ``pairs`` and ``persistent`` may be changed between estimates, and are checked then too (persistent
    particles need reset() after a change of ``pairs``).

    Args:
        trainer: the LearnedOptimizerTrainer whose unroll defines the meta-loss.
        sigma: standard deviation of the perturbations (same units as the meta-parameters).
        pairs: N, the number of antithetic pairs per estimate: 2N unrolls (antithetic ES adds one at
            phi itself, for the meta-loss it reports and the state it returns).
        persistent: keep each particle's inner state across calls (truncated unrolls of one inner
            problem) and accumulate its perturbations; :meth:`reset` starts a new inner problem.
        seed: seed of the perturbations (None: torch's global generator).
    """

    sigma = CheckedSetting(_positive_sigma)
    pairs = CheckedSetting(lambda value: require_int("pairs", value, 1))
    persistent = CheckedSetting(lambda value: require_bool("persistent", value))

    def __init__(self, trainer: LearnedOptimizerTrainer, sigma: float = 0.01, pairs: int = 8, *,
                 persistent: bool = False, seed: int | None = None):
        if not isinstance(trainer, LearnedOptimizerTrainer):
            raise TypeError(f"trainer must be a LearnedOptimizerTrainer, got {type(trainer).__name__}")
        self.sigma, self.pairs, self.persistent = sigma, pairs, persistent
        seed = require_seed("ESEstimator", seed)
        self.trainer = trainer
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reset()

    def reset(self) -> None:
        """Persistent ES: the next estimate starts a new inner problem (particles from the start, xi = 0)."""
        self._particles: list[UnrollState] | None = None
        self._xi: torch.Tensor | None = None
        self._xi_params: list[torch.nn.Parameter] | None = None

    def _params(self) -> list[torch.nn.Parameter]:
        """The meta-parameters that require grad; ValueError if there are none."""
        params = [p for p in self.trainer.lopt.parameters() if p.requires_grad]
        if not params:
            raise ValueError("ESEstimator: no parameter of the learned optimizer requires grad; there is nothing to estimate")
        return params

    @eager_under_compile
    def estimate(self, loss_fn, support, steps: int, *, state: UnrollState | None = None, query=None,
                 meta_loss: str = "inner", step_weights=None) -> ESResult:
        """Unrolls every particle for ``steps`` steps (arguments as :meth:`LearnedOptimizerTrainer.unroll`;
        ``state``: where antithetic ES starts, not allowed with persistent ES, whose particles continue
        their own) and adds the estimate to each meta-parameter's ``.grad``."""
        if self.persistent and state is not None:
            raise ValueError("persistent ES continues its particles' own states; call reset() instead of passing state")
        params = self._params()
        if self.persistent and self._particles is not None and not _same_tensors(params, self._xi_params):
            raise ValueError("ESEstimator: the learned optimizer's parameters that require grad changed since the "
                             "persistent particles started (their accumulated perturbations no longer fit); call "
                             "reset() to start a new inner problem")
        if self.persistent and self._particles is not None and len(self._particles) != 2 * self.pairs:
            raise ValueError(f"ESEstimator: pairs is {self.pairs}, but the persistent particles started with "
                             f"{len(self._particles) // 2} pairs; call reset() to start a new inner problem")
        phi = torch.nn.utils.parameters_to_vector(params).detach()
        eps = torch.randn(self.pairs, phi.numel(), generator=self.generator, dtype=phi.dtype).to(phi.device) * self.sigma
        unroll = dict(steps=steps, query=query, meta_loss=meta_loss, step_weights=step_weights, track_meta_gradient=False)
        if not self.persistent:
            starts, directions = [state] * (2 * self.pairs), eps
        elif self._particles is None:
            T = task_count(support[0] if isinstance(support, list) else support, "support")
            starts, directions = [self.trainer.initial_state(T)] * (2 * self.pairs), eps
        else:
            starts, directions = self._particles, self._xi + eps
        entered = forward_state.capture(self.trainer.layout.parameters()[0].device, self.trainer.evaluator.model)
        losses, ends = [], []
        for i in range(2 * self.pairs):
            sign = 1.0 if i % 2 == 0 else -1.0
            perturbed = phi + sign * eps[i // 2]
            result = self._unroll_at(params, perturbed, loss_fn, support, starts[i], unroll, entered)
            losses.append(result.meta_loss)
            ends.append(result.state)
        losses = torch.stack(losses)
        flat_grad = (losses[0::2] - losses[1::2]) @ directions / (2 * self.pairs * self.sigma**2)
        if self.persistent:  # only now: an unroll that raised leaves the particles as they were
            self._particles, self._xi, self._xi_params = ends, directions, params
            meta, end = losses.mean(), None
        else:
            center = self._unroll_at(params, phi, loss_fn, support, state, unroll, entered)
            meta, end = center.meta_loss, center.state
        gradient = _split_like(flat_grad, params)
        torch.autograd.backward(params, [g.clone() for g in gradient])
        return ESResult(meta, gradient, end)

    def _unroll_at(self, params, phi: torch.Tensor, loss_fn, support, state, unroll: dict, entered):
        """One unroll with the meta-parameters set to ``phi``, starting from the random-number state and
        model buffers the estimate found (``entered``)."""
        saved = [p.detach().clone() for p in params]
        forward_state.restore(entered)
        try:
            with torch.no_grad():
                for p, value in zip(params, _split_like(phi, params)):
                    p.copy_(value)
            return self.trainer.unroll(loss_fn, support, state=state, **unroll)
        finally:
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _split_like(flat: torch.Tensor, params) -> list[torch.Tensor]:
    """``flat`` [D] cut into tensors shaped as ``params`` (model order).  NOTE: values are copied into the
    parameters with these; torch.nn.utils.vector_to_parameters would instead rebind each parameter's
    ``.data`` to a view of the vector, changing its storage under optimizers and tied weights."""
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]
