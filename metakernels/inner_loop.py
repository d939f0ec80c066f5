"""The inner-loop engine shared by the meta-algorithms: K update steps of T tasks at once on flat
[T, P] fast weights.

The recipe (exact, see DESIGN.md): the per-task weights are stacked as [T, P]; only the forward is
vectorised over tasks (``torch.vmap``, or a Python loop for models vmap cannot trace); the inner
gradients come from one ``torch.autograd.grad`` of the summed task losses with respect to the [T, P]
weights (``create_graph=True`` for second order); the update is a fused op of metakernels.ops
(plain SGD with a number as its rate: an add, the rate on the gradient's seed; see InnerOptimizer.descend).
``torch.func``'s vmap-of-grad recipe is not used: its LayerNorm batching rule gives second-order
meta-gradients about 1% off."""
from __future__ import annotations

import contextlib
import dataclasses
import traceback
import warnings

import torch
from torch import nn

from . import forward_state, ops
from .bound_model import BoundModel
from .layout import ParamLayout
from .ops._checks import require_bool, require_number, warn_float16_second_moment
from .ops.linear import TaskLinearMode
from .recompute_guard import forward_not_recomputed
from .saved_views import saved_as_copies, storage_held_only_by
from .tasks import select_tasks

INNER_OPTIMIZERS = ("sgd", "momentum", "adam")
NAN_POLICIES = ("raise", "ignore")  # what to do with a non-finite inner loss (see check_finite)


def refuse_inference_mode(where: str) -> None:
    """Inner steps take gradients, which torch.inference_mode() forbids (and enable_grad cannot undo)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{where}: the inner steps take gradients, which torch.inference_mode() forbids; "
                           "use torch.no_grad() instead (the inner gradients are then still taken, and no "
                           "meta-gradient is recorded)")


@dataclasses.dataclass(frozen=True)
class InnerOptimizer:
    """The inner update rule and its fixed hyper-parameters (the rate is passed separately)."""

    name: str = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {self.name!r}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        require_number("MAML", "momentum", self.momentum, low=0.0)
        for name, beta in zip(("beta1", "beta2"), self.betas):
            require_number("MAML", name, beta, low=0.0, high=1.0, high_open=True)
        require_number("MAML", "eps", self.eps, low=0.0)

    def initial_state(self, P: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.name == "adam":
            warn_float16_second_moment("MAML inner_optimizer='adam'", like.dtype, self.betas[1])
        zeros = torch.zeros(P, dtype=like.dtype, device=like.device)
        return {"sgd": (), "momentum": (zeros,), "adam": (zeros, zeros)}[self.name]

    def descend(self, params, views, losses, state, lr, step: int, layout: ParamLayout, create_graph: bool = False,
                reuse_holders: int | None = None):
        """(params', state') after update number ``step`` (1-based) of ``params`` ([T, P], or [P] shared by
        the tasks) by the gradient of the summed ``losses`` with respect to ``views``, the per-parameter
        [T, *shape] fast weights the losses were computed from (``layout.unflatten_for_update``).

        reuse_holders: the number of tensors the caller knows to hold ``params``' storage (``params``,
        ``views`` and the caller's own); when nothing else holds it (no saved tensor: see
        :mod:`metakernels.saved_views`), plain SGD writes params' into params' memory instead of a new
        [T, P] tensor, which lowers the step's peak by one [T, P].

        Plain SGD with a number as its rate differentiates ``-lr * sum(losses)`` and adds the result onto
        ``params`` while packing it into the flat layout (one pass): the rate rides on the backward's seed,
        so the meta-backward does not multiply the step's [T, P] cotangent by it (3-7% of a second-order
        meta-step of the benchmark LM on CPU).  Only for float32 and float64 weights outside autocast: a
        seed scaled by the rate could underflow in a float16 backward.  The result equals the plain step's
        up to rounding (the float32 parts of a float64 model, such as Hugging Face's loss, round the scaled
        gradients differently)."""
        plain_sgd = self.name == "sgd" and isinstance(lr, (int, float)) and _seed_can_carry_rate(params)
        seed = losses.sum() * -lr if plain_sgd else losses.sum()
        parts = (torch.autograd.grad(seed, tuple(views.values()), create_graph=create_graph, allow_unused=True)
                 if seed.requires_grad else ())  # a loss of the data alone has no graph at all
        if all(g is None for g in parts):
            raise ValueError(f"the inner loss does not depend on any adapted parameter (inner step {step}); "
                             "check loss_fn, or what 'adapt' selects")
        if plain_sgd:
            in_place = (reuse_holders is not None and params.dim() == 2 and params.is_contiguous()
                        and storage_held_only_by(params, reuse_holders))
            return layout.pack(parts, onto=params, in_place=in_place), ()
        return self.step(params, layout.pack(parts, onto=None), state, lr, step)

    def step(self, fast, grads, state, lr, step: int):
        """(fast', state') after update number ``step`` (1-based).  A tensor rate in another dtype or on
        another device than the weights (``torch.tensor(0.1)``, float32, for a float64 model; a rate left
        behind by ``maml.double()``) is cast to theirs, differentiably."""
        if isinstance(lr, torch.Tensor) and (lr.dtype != fast.dtype or lr.device != fast.device):
            lr = lr.to(device=fast.device, dtype=fast.dtype)
        if self.name == "sgd":
            return ops.sgd_update(fast, grads, lr), ()
        if self.name == "momentum":
            new, buf = ops.momentum_update(fast, grads, state[0], lr, self.momentum)
            return new, (buf,)
        new, m, v = ops.adam_update(fast, grads, state[0], state[1], step, lr, self.betas[0], self.betas[1], self.eps)
        return new, (m, v)


def _seed_can_carry_rate(fast: torch.Tensor) -> bool:
    return fast.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(fast.device.type)


def _device_of(params: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(params.values())).device if params else torch.device("cpu")


def _untraceable_advice(exc: BaseException) -> str:
    """A way around a known cause of a failed vmap trace, found in the traceback: transformers' test of a 2D
    attention mask (``padding_mask.all()``)."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename.replace("\\", "/").endswith("transformers/masking_utils.py"):
            return (" It failed in transformers' test of a 2D attention_mask: pass "
                    "metakernels.additive_attention_mask(mask) as the attention_mask to keep vmap.")
    return ""


class TaskBatchedModel:
    """Evaluates ``loss_fn(f, task_batch)`` for every task, ``f`` being the model called with that
    task's fast weights (the parameters outside the layout and the buffers are the model's own)."""

    def __init__(self, model: nn.Module, layout: ParamLayout, vectorize: bool | None = None):
        self.model = model
        self.layout = layout
        self.vectorize = require_bool("vectorize", vectorize, none_ok=True)  # None: try vmap, else loop
        self._warned_module_hooks = False
        self._vmap_traced = False

    def bind(self, params: dict[str, torch.Tensor]) -> BoundModel:
        """The model called with ``params`` (one task's adapted parameters, by name) in place of its own."""
        return BoundModel(self.model, params)

    def _one_task(self, loss_fn, params, task_batch):
        loss = loss_fn(self.bind(params), task_batch)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor, it returned a {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar (0-d) loss per task, it returned shape {list(loss.shape)}; "
                "reduce it, e.g. with .mean()"
            )
        return loss

    def losses(self, loss_fn, fast: torch.Tensor, batch, T: int) -> torch.Tensor:
        """[T] losses for fast weights [T, P] (unflattened before vmap, so that the backward packs the
        per-parameter cotangents of all tasks at once)."""
        return self.losses_of(loss_fn, self.layout.unflatten(fast), batch, T)

    def losses_of(self, loss_fn, params: dict[str, torch.Tensor], batch, T: int) -> torch.Tensor:
        """[T] losses for the per-parameter fast weights ``params`` (by name, each [T, *shape])."""
        self._warn_module_backward_hooks()
        if T == 1:  # NOTE: vmap's per-op overhead made memory='low' (one task per chunk) 1.5x slower
            return self._loop(loss_fn, params, batch, 1)
        if self.vectorize is not False:
            # NOTE: a trace that fails part way may have written buffers (BatchNorm counts the batch before it
            # refuses batched statistics) and drawn random numbers: until vmap has traced the model once, both
            # are put back on failure, so that the loop runs as with vectorize=False
            entered = None if self._vmap_traced else forward_state.capture(_device_of(params), self.model)
            try:
                with TaskLinearMode():
                    losses = torch.vmap(lambda w, b: self._one_task(loss_fn, w, b), randomness="different")(params, batch)
                self._vmap_traced = True
                return losses
            except (TypeError, ValueError):  # the user's loss_fn broke its contract: report, do not retry
                raise
            except Exception as exc:  # a model vmap cannot trace (data-dependent control flow, .item())
                if self.vectorize is True:
                    raise
                if entered is not None:
                    forward_state.restore(entered)
                # NOTE: an error of the model or loss_fn itself raises again in the loop, and then is not
                # reported as vmap's, nor does it switch vmap off for later calls.
                losses = self._loop(loss_fn, params, batch, T)
                warnings.warn(
                    f"metakernels: torch.vmap could not trace this model ({type(exc).__name__}: {str(exc)[:200]}); "
                    f"evaluating tasks in a loop instead (same results, slower).{_untraceable_advice(exc)} Pass "
                    "vectorize=False to silence this.", RuntimeWarning, stacklevel=3,
                )
                self.vectorize = False
                return losses
        return self._loop(loss_fn, params, batch, T)

    def _warn_module_backward_hooks(self) -> None:
        """One warning (per evaluator) if a module of the model, or torch globally, has backward hooks: the
        engine does not give them the meta-gradient once, as the parameters' own hooks get it."""
        if self._warned_module_hooks:
            return
        hooked = [name or type(self.model).__name__ for name, module in self.model.named_modules()
                  if module._backward_hooks or module._backward_pre_hooks]
        if nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks:
            hooked.insert(0, "every module (a global hook)")
        if hooked:
            self._warned_module_hooks = True
            warnings.warn(
                f"metakernels: module backward hooks (register_full_backward_hook, register_backward_hook, "
                f"register_full_backward_pre_hook) on {hooked[:3]} do not see the meta-gradient once: under "
                "torch.vmap (T > 1, the default) they do not run, and in a loop over tasks (vectorize=False, "
                "T = 1, memory='low') they run for every inner gradient too. Hooks on the parameters "
                "(p.register_hook) run once, on the meta-gradient, in every mode.", RuntimeWarning, stacklevel=4)

    def _loop(self, loss_fn, params, batch, T: int) -> torch.Tensor:
        # NOTE: unbind, whose backward stacks the T cotangents once; indexing p[t] per task made every task's
        # backward write a zero-filled [T, ...] tensor per parameter and autograd sum T of them (O(T^2)).
        per_task = {name: p.unbind(0) for name, p in params.items()}
        return torch.stack([self._one_task(loss_fn, {name: views[t] for name, views in per_task.items()},
                                           select_tasks(batch, t)) for t in range(T)])


def check_finite(losses: torch.Tensor, what: str, step: int, first_task: int = 0,
                 remedy: str = "lower inner_lr") -> None:
    """Raises on a non-finite loss, naming its task (``first_task`` + its index in ``losses``) and step, and
    the remedies: ``remedy`` (the algorithm's step size), the task's data, or nan_policy='ignore'."""
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).nonzero()[0, 0])
        raise FloatingPointError(
            f"{what} loss is {losses[bad].item()} for task {first_task + bad} at inner step {step}; {remedy}, "
            "check that task's data, or pass nan_policy='ignore'"
        )


def run_inner_loop(evaluator: TaskBatchedModel, theta0: torch.Tensor, lr, loss_fn, support, T: int, steps: int,
                   optimizer: InnerOptimizer, create_graph: bool, keep_graph: bool = True,
                   nan_policy: str = "raise", first_task: int = 0, where: str = "MAML") -> torch.Tensor:
    """Fast weights [T, P] after ``steps`` updates from the shared initialisation ``theta0`` [P].

    create_graph: record the inner gradients' graph (second order).  Each step from the second on then
    saves copies of just the weights its ops read back, not views that pin its whole [T, P] fast weights
    (:mod:`metakernels.saved_views`), and plain SGD writes the next weights into the memory of the
    previous ones where nothing else holds it.  keep_graph=False detaches the weights after every step
    (adaptation for evaluation, no meta-gradient).  first_task: the index of this batch's first task in
    the caller's, and ``where`` the caller's name, for error messages."""
    if not keep_graph:
        theta0 = theta0.detach()
    params = theta0
    state = optimizer.initial_state(theta0.shape[0], theta0)
    for k in range(1, steps + 1):
        if not params.requires_grad:  # a frozen or detached initialisation still needs inner gradients
            params = (params.expand(T, -1) if params.dim() == 1 else params).detach().requires_grad_()
        views, base = evaluator.layout.unflatten_for_update(params, T)
        compact = create_graph and keep_graph and k > 1  # step 1's [P] weights are shared, not copied per task
        with saved_as_copies(params) if compact else contextlib.nullcontext():
            losses = evaluator.losses_of(loss_fn, views, support, T)
            if nan_policy == "raise":
                check_finite(losses, "inner (support)", k, first_task)
            holders = len(views) + 2 if compact else None  # params, base and the views hold its storage
            with forward_not_recomputed(evaluator.model, where):
                params, state = optimizer.descend(base, views, losses, state, lr, k, evaluator.layout, create_graph,
                                                  reuse_holders=holders)
        if not keep_graph:
            params = params.detach()
            state = tuple(s.detach() for s in state)
    return params if params.dim() == 2 else params.expand(T, -1)
