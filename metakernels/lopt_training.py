"""Meta-training a learned optimizer: backpropagation through K unrolled inner steps of training a model
on T tasks at once, on the inner-loop engine (stacked [T, P] fast weights, vmap over the forward, inner
gradients from one ``torch.autograd.grad``) with the fused learned step as the update.

    trainer = LearnedOptimizerTrainer(lopt, model)
    result = trainer.unroll(loss_fn, support, steps=K)        # or a list of K per-step batches
    result.meta_loss.backward()                              # gradients on lopt's meta-parameters
    result = trainer.unroll(loss_fn, support, steps=K, state=result.state)   # truncated: continue

Meta-loss, with theta_0 the start, theta_{k+1} = U(theta_k, grad L_k(theta_k), s_k; phi):
    meta_loss="inner" (default, Metz et al.): sum_k w_k mean_t L_k(theta_k) over k = 1..K, divided by
        sum_k w_k, where L_k is the task's loss on step k's batch (on the last batch for k = K);
    meta_loss="query": mean_t L_query(theta_K).
``first_order=True`` treats the inner gradients as constants (no Hessian-vector products); the default
differentiates through them exactly.  The start theta_0 is the model's parameters (or ``init``) and is
not meta-trained.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from .attention_backend import twice_differentiable_attention
from .checked_setting import CheckedSetting, one_of
from .double_backward import refuse_layers_without_double_backward
from .eager_under_compile import eager_under_compile
from .inner_loop import NAN_POLICIES, TaskBatchedModel, check_finite, refuse_inference_mode
from .layout import AdaptSpec, ParamLayout
from .learned_optimizer import LearnedOptimizer
from .ops._checks import require_bool, require_int
from .recompute_guard import forward_not_recomputed
from .tasks import task_count

META_LOSSES = ("inner", "query")


@dataclasses.dataclass
class UnrollState:
    """Where a truncated unroll stopped: fast weights [T, P], optimizer state [4, T, P], next step."""

    fast: torch.Tensor
    opt_state: torch.Tensor
    step: int


@dataclasses.dataclass
class UnrollResult:
    meta_loss: torch.Tensor  # 0-d; differentiable w.r.t. the learned optimizer unless track_meta_gradient=False
    losses: torch.Tensor     # [K + 1, T]: each task's loss at theta_0 .. theta_K (the last on the final batch)
    state: UnrollState       # detached, to continue with a truncated unroll


class LearnedOptimizerTrainer:
    """Unrolls a learned optimizer on a model for T tasks at once.

    Args:
        lopt: the LearnedOptimizer whose meta-parameters are trained.
        model: any nn.Module; ``loss_fn(f, batch)`` calls it bound to one task's weights, as in MAML.
        first_order: drop the second-order terms (no gradient through the model's Hessian).
        adapt: which parameters the learned optimizer trains (as in MAML); the others stay fixed.
        vectorize: vmap the tasks (None: try, fall back to a loop).
        nan_policy: "raise" (default) stops at a non-finite inner loss, naming the task and step.
    ``first_order`` and ``nan_policy`` may be changed between unrolls, and are checked then too.
    """

    first_order = CheckedSetting(lambda value: require_bool("first_order", value))
    nan_policy = CheckedSetting(one_of("nan_policy", NAN_POLICIES))

    def __init__(self, lopt: LearnedOptimizer, model: nn.Module, *, first_order: bool = False,
                 adapt: AdaptSpec = None, vectorize: bool | None = None, nan_policy: str = "raise"):
        if not isinstance(lopt, LearnedOptimizer):
            raise TypeError(f"lopt must be a LearnedOptimizer, got {type(lopt).__name__}")
        self.first_order, self.nan_policy = first_order, nan_policy
        self.lopt = lopt
        self.layout = ParamLayout(model, adapt)
        self.evaluator = TaskBatchedModel(model, self.layout, vectorize)
        self._second_order_checked = False

    def initial_state(self, num_tasks: int, init: torch.Tensor | None = None) -> UnrollState:
        """Start of an unroll: ``init`` ([P] or [T, P], the adapted parameters' dtype and device) or the
        model's parameters, zero optimizer state."""
        P = self.layout.numel
        if init is None:
            start = self.layout.flatten().detach()
        else:
            if not isinstance(init, torch.Tensor):
                raise TypeError(f"init must be a tensor [{P}] or [{num_tasks}, {P}], got {type(init).__name__}")
            self._check_like_model("init", init)
            start = init.detach()
        if start.shape not in ((P,), (num_tasks, P)):
            raise ValueError(f"init must be [{P}] or [{num_tasks}, {P}], got {list(start.shape)}")
        fast = start.expand(num_tasks, P).clone()
        return UnrollState(fast, self.lopt.initial_state(fast), 0)

    def _check_like_model(self, name: str, tensor: torch.Tensor) -> None:
        """TypeError unless tensor has the adapted parameters' dtype and device."""
        params = self.layout.parameters()
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
        device = params[0].device
        if tensor.dtype != dtype or tensor.device != device:
            raise TypeError(f"{name} is {tensor.dtype} on {tensor.device}; the model's adapted parameters are "
                            f"{dtype} on {device}")

    def _check_state(self, state, T: int) -> None:
        """A clear error unless ``state`` continues an unroll of this trainer's model on T tasks."""
        if not isinstance(state, UnrollState):
            raise TypeError(f"state must be an UnrollState (the state of an earlier unroll), got {type(state).__name__}")
        P = self.layout.numel
        if tuple(state.fast.shape) != (T, P):
            raise ValueError(f"state.fast must be [{T}, {P}] ({T} tasks, this model's {P} adapted parameters), "
                             f"got {list(state.fast.shape)}")
        if tuple(state.opt_state.shape) != (4, T, P):
            raise ValueError(f"state.opt_state must be [4, {T}, {P}], got {list(state.opt_state.shape)}")
        self._check_like_model("state.fast", state.fast)
        self._check_like_model("state.opt_state", state.opt_state)
        require_int("state.step", state.step, 0)

    @eager_under_compile
    def unroll(self, loss_fn, support, steps: int, *, state: UnrollState | None = None, query=None,
               meta_loss: str = "inner", step_weights=None, track_meta_gradient: bool = True) -> UnrollResult:
        """Runs ``steps`` learned updates of every task.  ``support`` is one batch with a leading task
        dimension used at every step, or a list of ``steps`` such batches (one per step).  Under
        torch.no_grad() it runs as with ``track_meta_gradient=False``: inner gradients only."""
        refuse_inference_mode("LearnedOptimizerTrainer.unroll")
        steps = require_int("steps", steps, 1)
        if meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {meta_loss!r}")
        per_step = isinstance(support, list)
        if per_step and len(support) != steps:
            raise ValueError(f"support is a list of {len(support)} batches; expected one per step ({steps})")
        batches = support if per_step else [support] * steps
        T = task_count(batches[0], "support")
        for k, batch in enumerate(batches[1:], start=1):
            if task_count(batch, f"support[{k}]") != T:
                raise ValueError(f"support[{k}] has T={task_count(batch, f'support[{k}]')} tasks, support[0] has T={T}")
        if meta_loss == "query":
            if query is None:
                raise ValueError("meta_loss='query' needs a query batch")
            if task_count(query, "query") != T:
                raise ValueError(f"query has T={task_count(query, 'query')} tasks, support has T={T}")
        elif query is not None:
            raise ValueError("query is given but meta_loss='inner' does not use it; pass meta_loss='query' to "
                             "take the meta-loss on the query batch")
        weights = self._step_weights(step_weights, steps)
        if state is None:
            state = self.initial_state(T)
        else:
            self._check_state(state, T)
        track_meta_gradient = require_bool("track_meta_gradient", track_meta_gradient) and torch.is_grad_enabled()
        create_graph = track_meta_gradient and not self.first_order
        fast, opt_state = state.fast, state.opt_state
        history, terms = [], []
        for k in range(steps):
            # the inner gradients, also under the caller's no_grad, through twice-differentiable attention
            with torch.enable_grad(), twice_differentiable_attention(create_graph):
                if not fast.requires_grad:
                    fast = fast.detach().requires_grad_()
                losses = self._losses(loss_fn, fast, batches[k], T, state.step + k, "inner")
                with forward_not_recomputed(self.evaluator.model, "LearnedOptimizerTrainer.unroll"):
                    (grads,) = torch.autograd.grad(losses.sum(), fast, create_graph=create_graph,
                                                   retain_graph=track_meta_gradient)
            if create_graph and not self._second_order_checked:
                refuse_layers_without_double_backward(grads, "the learned optimizer's second-order unroll")
                self._second_order_checked = True
            history.append(losses.detach())
            if k > 0 and meta_loss == "inner":
                terms.append(weights[k - 1] * (losses.mean() if track_meta_gradient else losses.detach().mean()))
            with torch.set_grad_enabled(track_meta_gradient):
                fast, opt_state = self.lopt.update(fast, grads, opt_state, state.step + k, segments=self.layout.numels)
            if not track_meta_gradient:
                fast, opt_state = fast.detach(), opt_state.detach()
        final = self._losses(loss_fn, fast, query if meta_loss == "query" else batches[-1], T, state.step + steps,
                             meta_loss)
        history.append(final.detach())
        if meta_loss == "inner":
            terms.append(weights[-1] * final.mean())
            meta = torch.stack(terms).sum() / float(sum(weights))
        else:
            meta = final.mean()
        if not track_meta_gradient:
            meta = meta.detach()
        return UnrollResult(meta, torch.stack(history), UnrollState(fast.detach(), opt_state.detach(), state.step + steps))

    def _losses(self, loss_fn, fast, batch, T, step, what):
        losses = self.evaluator.losses(loss_fn, fast, batch, T)
        if self.nan_policy == "raise":
            check_finite(losses, what, step, remedy="lower the learned optimizer's step_mult (mk.ops.LoptHyper)")
        return losses

    @staticmethod
    def _step_weights(step_weights, steps: int) -> list[float]:
        if step_weights is None:
            return [1.0] * steps
        weights = [float(w) for w in step_weights]
        if len(weights) != steps or not all(0 <= w < math.inf for w in weights) or sum(weights) <= 0:
            raise ValueError(f"step_weights must be {steps} finite non-negative numbers with a positive sum, "
                             f"got {weights}")
        return weights
