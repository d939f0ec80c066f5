"""Meta-gradient descent: MAML (second order), first-order MAML, Meta-SGD and subset (ANIL, LoRA)
adaptation, for T tasks at once on the inner-loop engine.

    maml = MAML(model, inner_lr=0.1, inner_steps=1)
    meta_loss = maml(loss_fn, support, query)   # mean query loss over tasks after K inner steps
    meta_loss.backward()                        # exact meta-gradient on the model's parameters

Meta-loss:  L(theta) = 1/T sum_t loss_fn(f_{theta_t^K}, query_t),
            theta_t^0 = theta,  theta_t^{k+1} = U(theta_t^k, grad loss_fn(f_{theta_t^k}, support_t))
where U is the fused sgd / momentum / adam update.  Second order differentiates through the inner
gradients (Hessian-vector products); first order treats them as constants.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import forward_state
from ._autograd import cached_signature, raise_when_differentiated
from .attention_backend import twice_differentiable_attention
from .checked_setting import CheckedSetting, one_of
from .chunk_scale import ChunkLossScale, float16_backward
from .double_backward import refuse_layers_without_double_backward
from .eager_under_compile import eager_under_compile
from .graph_leaves import grad_without_hooks, leaves_outside, with_stand_ins
from .inner_loop import (NAN_POLICIES, InnerOptimizer, TaskBatchedModel, check_finite, refuse_inference_mode,
                         run_inner_loop)
from .layout import AdaptSpec, ParamLayout
from .nn import fuse_layers
from .ops._checks import as_integer, require_bool, require_int, require_number
from .reverse_sweep import add_optional, chunk_meta_gradients
from .saved_views import saved_as_copies
from .tasks import select_tasks, task_count

MEMORY_MODES = ("fast", "low")
_CHUNKED_NOT_TWICE = ("metakernels: with task_chunk or memory='low', MAML takes the meta-gradient inside the forward, "
                      "so the meta-gradient has no derivative of its own (create_graph=True, then differentiating "
                      "again); differentiate the meta-gradient in the fast mode (task_chunk=None, memory='fast')")


@cached_signature
class _InjectGradients(torch.autograd.Function):
    """Returns ``value``; its backward hands each parameter a precomputed gradient (times the
    incoming cotangent).  Used when tasks are differentiated chunk by chunk in the forward (task_chunk).
    Those gradients are numbers, not functions of the parameters: a backward with create_graph=True
    returns them tied to a node that raises when differentiated, instead of a silently zero Hessian.
    ``value`` is saved only so that a second backward without retain_graph=True raises as the fast
    mode's graph does, instead of handing the gradients over twice."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        ctx.params = params  # only to tie a create_graph backward to; not saved: no in-place check is due
        ctx.save_for_backward(value)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        ctx.saved_tensors  # raises once the graph has been freed by an earlier backward
        grads = tuple(None if g is None else g * grad_out for g in ctx.grads)
        if torch.is_grad_enabled():
            grads = raise_when_differentiated(_CHUNKED_NOT_TWICE, (*ctx.params, grad_out), grads)
        return (None, None, *grads)


class AdaptedModel:
    """Fast weights [T, P] after adaptation, with ways to call the model with them."""

    def __init__(self, evaluator: TaskBatchedModel, fast: torch.Tensor):
        self._evaluator = evaluator
        self.fast = fast
        self.num_tasks = fast.shape[0]

    def params(self, task: int) -> dict[str, torch.Tensor]:
        """The adapted parameters of one task, by name (the others are the model's own)."""
        index = as_integer(task)
        if index is None:
            raise TypeError(f"task must be an int in [0, {self.num_tasks}), got {type(task).__name__}")
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"task {index} is out of range for {self.num_tasks} adapted tasks")
        return self._evaluator.layout.unflatten(self.fast[index])

    def task(self, task: int):
        """The model bound to task ``task``'s weights (a :class:`metakernels.BoundModel`): call it like the
        model; its ``named_parameters()`` are the task's weights."""
        return self._evaluator.bind(self.params(task))

    def module(self, task: int) -> nn.Module:
        """A standalone copy of the model holding task ``task``'s adapted weights, to save or serve alone;
        changing it leaves the shared model and the other tasks' weights as they are."""
        weights = self.params(task)
        standalone = copy.deepcopy(self._evaluator.model)
        with torch.no_grad():
            for name, weight in weights.items():
                standalone.get_parameter(name).copy_(weight)
        return standalone

    def losses(self, loss_fn, batch) -> torch.Tensor:
        """[T] losses of every task on its own batch (leading task dimension T), without a graph."""
        T = task_count(batch, "batch")
        if T != self.num_tasks:
            raise ValueError(f"batch has T={T} tasks, the weights were adapted for {self.num_tasks}")
        with torch.no_grad():
            return self._evaluator.losses(loss_fn, self.fast, batch, T)


def _check_inner_lr(inner_lr, P: int) -> None:
    """A clear error unless inner_lr is a finite number >= 0, or a floating-point tensor of such rates
    shaped as the update ops take it: [] (one rate), [P] (per parameter) or [T, P] (per task)."""
    if isinstance(inner_lr, torch.Tensor):
        if not inner_lr.dtype.is_floating_point:
            raise TypeError(f"MAML: argument 'inner_lr' must be a floating-point tensor, got dtype {inner_lr.dtype}")
        if inner_lr.dim() > 2 or (inner_lr.dim() > 0 and inner_lr.shape[-1] != P):
            raise ValueError(f"MAML: argument 'inner_lr' must be a number or a tensor [], [{P}] or [T, {P}] (this "
                             f"model's {P} adapted parameters), got shape {list(inner_lr.shape)}")
        with torch.no_grad():
            valid = bool(torch.isfinite(inner_lr).all() and (inner_lr >= 0).all())
        if not valid:
            raise ValueError("MAML: argument 'inner_lr' must hold finite rates >= 0; this tensor has a NaN, Inf "
                             "or negative one")
    else:
        require_number("MAML", "inner_lr", inner_lr, low=0.0)


class MAML(nn.Module):
    """Model-agnostic meta-learning over a batch of tasks.  The settings ``inner_steps``, ``first_order``,
    ``memory``, ``task_chunk`` and ``nan_policy`` may be changed between calls, and are checked then too.

    Args:
        model: any nn.Module; its parameters with requires_grad=False never adapt.
        inner_lr: inner learning rate: a number >= 0, or a tensor [] / [P] / [T, P] of rates.
        inner_steps: K, the number of inner updates.
        first_order: drop the second-order terms (FOMAML).
        inner_optimizer: "sgd" (default), "momentum" or "adam", run by the fused update ops;
            momentum, betas, eps are their hyper-parameters.
        adapt: which parameters adapt: None (all trainable), a predicate (name, param) -> bool, or a
            list of names (ANIL: the head; LoRA: the adapters).  The others are shared by all tasks
            and still receive meta-gradients.
        memory: "fast" keeps the whole inner graph of the tasks it differentiates at once; "low" keeps
            one inner step's graph at a time when second order (a reverse sweep that recomputes each
            step, see :mod:`metakernels.reverse_sweep`), so peak memory is that of one step of a chunk,
            at the cost of speed.
        task_chunk: how many tasks are differentiated at once.  None: all T in one graph with
            memory="fast", one at a time with memory="low".  A number: chunks of that many tasks, each
            differentiated inside the forward and freed before the next is built (the peak is one
            chunk's), whose meta-gradients ``.backward()`` then hands to the parameters.
        nan_policy: "raise" reports a non-finite inner or query loss with its task and step;
            "ignore" lets it through.
        vectorize: True (torch.vmap over tasks), False (a Python loop over the forward only), or
            None: try vmap and fall back to the loop with one warning.
        fused_layers: swap metakernels' fused, twice-differentiable LayerNorm / RMSNorm / bias + GELU
            into ``model`` (in place, same parameters: see :func:`metakernels.nn.fuse_layers`); the
            list of what changed is ``self.fused_layers``.
    """

    inner_steps = CheckedSetting(lambda value: require_int("inner_steps", value, 0))
    first_order = CheckedSetting(lambda value: require_bool("first_order", value))
    memory = CheckedSetting(one_of("memory", MEMORY_MODES))
    task_chunk = CheckedSetting(lambda value: None if value is None else require_int("task_chunk", value, 1,
                                                                                     note=" or None"))
    nan_policy = CheckedSetting(one_of("nan_policy", NAN_POLICIES))

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 1, first_order: bool = False,
                 inner_optimizer: str = "sgd", momentum: float = 0.9, betas=(0.9, 0.999), eps: float = 1e-8,
                 adapt: AdaptSpec = None, memory: str = "fast", task_chunk: int | None = None,
                 nan_policy: str = "raise", vectorize: bool | None = None, fused_layers: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.inner_steps, self.first_order, self.memory = inner_steps, first_order, memory
        self.task_chunk, self.nan_policy = task_chunk, nan_policy
        self.fused_layers = fuse_layers(model) if require_bool("fused_layers", fused_layers) else []
        self.module = model
        self.inner_lr = inner_lr
        self.optimizer = InnerOptimizer(inner_optimizer, momentum, tuple(betas), eps)
        self.layout = ParamLayout(model, adapt)
        _check_inner_lr(inner_lr, self.layout.numel)
        self._evaluator = TaskBatchedModel(model, self.layout, vectorize)
        self._second_order_checked = False
        self._chunk_scale = ChunkLossScale()

    def inner_rate(self):
        """The inner learning rate as the update ops take it (a number or a tensor)."""
        return self.inner_lr

    def inner_rate_of_tasks(self, first_task: int, T: int):
        """The inner rate for tasks first_task .. first_task + T - 1 of the batch: a per-task [T', P] rate
        restricted to those rows (a chunk of tasks gets its own tasks' rates), any other as it is."""
        rate = self.inner_rate()
        if isinstance(rate, torch.Tensor) and rate.dim() == 2:
            return rate[first_task:first_task + T]
        return rate

    def _check_rate_fits(self, T: int) -> None:
        """A per-task rate has the batch's T rows, and a number rate is >= 0 (as the constructor checks it:
        ``inner_lr`` may have been set since).  Only ``inner_lr`` can be per task (learned rates are [P] or
        []): reading it spares MetaSGD building its rate one more time per call."""
        rate = self.inner_lr
        if not isinstance(rate, torch.Tensor):
            require_number("MAML", "inner_lr", rate, low=0.0)
        elif rate.dim() == 2 and rate.shape[0] != T:
            raise ValueError(f"inner_lr is a per-task rate of shape {list(rate.shape)}, one row per task, but the "
                             f"batch has T={T} tasks; give {T} rows, or a [P] or [] rate for any T")

    @eager_under_compile
    def forward(self, loss_fn, support, query) -> torch.Tensor:
        """Mean query loss over the T tasks after K inner steps on their support sets.  Under
        torch.no_grad() the inner gradients are still taken and the loss comes back without a graph."""
        refuse_inference_mode("MAML.forward")
        with twice_differentiable_attention(torch.is_grad_enabled() and not self.first_order):
            return self._forward(loss_fn, support, query)

    def _forward(self, loss_fn, support, query) -> torch.Tensor:
        T = task_count(support, "support")
        T_query = task_count(query, "query")
        if T_query != T:
            raise ValueError(f"support has T={T} tasks but query has T={T_query}; they must match")
        self._check_rate_fits(T)
        if not torch.is_grad_enabled() or (self.memory == "fast" and self.task_chunk is None):
            return self._meta_loss(loss_fn, support, query, T)
        meta_params = [p for p in self.parameters() if p.requires_grad]
        originals = {}  # id(stand-in) -> the batch tensor it stands in for
        support, query = with_stand_ins(support, originals), with_stand_ins(query, originals)
        total, sums = None, {}  # id -> (target, its gradient summed over the chunks so far)
        chunk_size = self.task_chunk or 1
        scaled = float16_backward(meta_params)  # then each chunk's loss is scaled (metakernels.chunk_scale)
        for start in range(0, T, chunk_size):
            chunk = slice(start, min(start + chunk_size, T))
            n = chunk.stop - chunk.start
            chunk_support, chunk_query = select_tasks(support, chunk), select_tasks(query, chunk)
            factor = self._chunk_scale.value if scaled else 1.0
            entered = forward_state.capture(meta_params[0].device, self.module) if factor != 1.0 else None
            loss, targets, chunk_grads = self._chunk_gradients(loss_fn, chunk_support, chunk_query, n, T, start,
                                                               meta_params, factor)
            if scaled and not self._chunk_scale.accepts(chunk_grads) and factor != 1.0:
                forward_state.restore(entered)  # the retake: the same dropout masks and buffers
                factor = 1.0
                loss, targets, chunk_grads = self._chunk_gradients(loss_fn, chunk_support, chunk_query, n, T, start,
                                                                   meta_params, factor)
            if factor != 1.0:
                chunk_grads = [None if g is None else g / factor for g in chunk_grads]
            for target, g in zip(targets, chunk_grads):
                target = originals.get(id(target), target)
                sums[id(target)] = (target, add_optional(sums.get(id(target), (None, None))[1], g))
            total = loss if total is None else total + loss
        targets, grads = zip(*sums.values()) if sums else ((), ())
        return _InjectGradients.apply(total, list(grads), *targets)

    def _chunk_gradients(self, loss_fn, support, query, n: int, T: int, first_task: int, meta_params, factor: float):
        """For the chunk of n of the T tasks starting at ``first_task``: (n / T x its mean query loss, the
        targets, factor x the loss's gradient for each target, None where unused), the chunk's graph freed on
        return.  The targets are ``meta_params`` followed by what else the losses reach
        (:mod:`metakernels.graph_leaves`)."""
        if self.first_order or self.memory == "fast":
            loss = self._meta_loss(loss_fn, support, query, n, first_task=first_task) * (n / T)
            targets = meta_params + leaves_outside([loss], meta_params)
            # a leaf outside may hang on a graph built before this call (a closure's), which every chunk traverses
            grads = grad_without_hooks(loss * factor, targets, allow_unused=True,
                                       retain_graph=len(targets) > len(meta_params))
            return loss.detach(), targets, grads
        return chunk_meta_gradients(self, loss_fn, support, query, n, n / T, meta_params, first_task=first_task,
                                    seed_scale=factor)

    def _meta_loss(self, loss_fn, support, query, T: int, first_task: int = 0) -> torch.Tensor:
        tracked = torch.is_grad_enabled()
        second_order = not self.first_order and tracked
        theta0, rate = self.layout.flatten(), self.inner_rate_of_tasks(first_task, T)
        with torch.enable_grad():  # the inner gradients, also under the caller's no_grad
            fast = run_inner_loop(
                self._evaluator, theta0, rate, loss_fn, support, T, self.inner_steps, self.optimizer,
                create_graph=second_order, keep_graph=tracked, nan_policy=self.nan_policy, first_task=first_task,
                where=type(self).__name__,
            )
        if second_order and not self._second_order_checked:
            self._check_twice_differentiable(fast)
        with saved_as_copies(fast):
            losses = self._evaluator.losses(loss_fn, fast, query, T)
        if self.nan_policy == "raise":
            check_finite(losses, "query", self.inner_steps, first_task)
        return losses.mean()

    def _check_twice_differentiable(self, fast: torch.Tensor) -> None:
        """Once: a layer without a double backward is named here, not deep in .backward()
        (:mod:`metakernels.double_backward`)."""
        refuse_layers_without_double_backward(fast, "second-order MAML")
        self._second_order_checked = True

    def adapt(self, loss_fn, support, steps: int | None = None) -> AdaptedModel:
        """Adapted weights for evaluation or serving: K (or ``steps``) inner steps, no graph kept."""
        refuse_inference_mode("MAML.adapt")
        if steps is not None:
            steps = require_int("steps", steps, 0)
        T = task_count(support, "support")
        self._check_rate_fits(T)
        rate = self.inner_rate()
        rate = rate.detach() if isinstance(rate, torch.Tensor) else rate
        with torch.enable_grad():
            fast = run_inner_loop(
                self._evaluator, self.layout.flatten(), rate, loss_fn, support, T,
                self.inner_steps if steps is None else steps, self.optimizer,
                create_graph=False, keep_graph=False, nan_policy=self.nan_policy, where=f"{type(self).__name__}.adapt",
            )
        return AdaptedModel(self._evaluator, fast.detach())


class MetaSGD(MAML):
    """MAML with learned inner learning rates (Li et al., 2017, "Meta-SGD"), parameters of this module
    registered in the model's parameter order (``inner_lrs``) and meta-trained with the initialisation.

    learn_lr: "parameter" (one rate per parameter element, the paper's), "tensor" (one per parameter
    tensor) or "scalar" (one for all).  ``inner_lr`` is their initial value."""

    LEARN_LR = ("parameter", "tensor", "scalar")

    def __init__(self, model: nn.Module, inner_lr: float = 0.1, inner_steps: int = 1, learn_lr: str = "parameter",
                 **kwargs):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, **kwargs)
        self._learn_lr = one_of("learn_lr", self.LEARN_LR)(learn_lr)
        params = self.layout.parameters()
        if learn_lr == "parameter":
            rates = [torch.full_like(p, float(inner_lr)) for p in params]
        elif learn_lr == "tensor":
            rates = [torch.full((), float(inner_lr), dtype=p.dtype, device=p.device) for p in params]
        else:
            rates = [torch.full((), float(inner_lr), dtype=params[0].dtype, device=params[0].device)]
        self.inner_lrs = nn.ParameterList(nn.Parameter(r) for r in rates)

    @property
    def learn_lr(self) -> str:
        """What the learned rates cover, fixed when built: ``inner_lrs`` are shaped for it."""
        return self._learn_lr

    @learn_lr.setter
    def learn_lr(self, value) -> None:
        raise AttributeError(f"MetaSGD.learn_lr is fixed when MetaSGD is built (its inner_lrs are shaped for "
                             f"{self._learn_lr!r}); build a new MetaSGD with learn_lr={value!r}")

    def inner_rate(self) -> torch.Tensor:
        """The learned inner rates as the update ops take them: [P] per parameter ("parameter" and
        "tensor", a tensor's rate repeated over its elements) or one 0-d rate ("scalar")."""
        if self.learn_lr == "parameter":
            return self.layout.flatten(dict(zip(self.layout.names, self.inner_lrs)))
        if self.learn_lr == "tensor":
            return torch.cat([r.expand(n) for r, n in zip(self.inner_lrs, self.layout.numels)])
        return self.inner_lrs[0]
