"""What each row of the final table trains and how it adapts to a task.

Meta-learners (``--algo``), each meta-trained for ``steps`` meta-steps of T tasks with Adam:
  maml     second-order MAML, K inner SGD steps at ``inner_lr``;
  fomaml   the same, first order;
  metasgd  Meta-SGD: per-parameter inner rates learned with the initialisation;
  lopt     a LearnedOptimizer meta-trained to fine-tune the *pretrained* baseline in K steps
           (second-order unrolls, meta-loss: the query loss after K steps).
Baselines:
  pretrained  the same model trained on all meta-train domains' chunks (support and query of the same
              task batches the meta-learners see, one Adam step per batch, ``steps`` steps), then
              fine-tuned per task with K steps of SGD or of Adam;
  scratch     the untrained model fine-tuned with K Adam steps.
Baselines' fine-tuning rates are chosen from a grid by the query loss after K steps on the
meta-validation tasks; the meta-test tasks choose nothing.
"""
from __future__ import annotations

import functools

import torch
from torch.utils._pytree import tree_map

from ..learned_optimizer import LearnedOptimizer
from ..lopt_training import LearnedOptimizerTrainer
from ..maml import MAML, MetaSGD
from ..ops.learned_update import LoptHyper
from ..tasks import task_count

SGD_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# exp_mult = 1 rather than Metz et al.'s 1e-3 (made for meta-training runs of many thousands of steps):
# the magnitude output then reaches the task family's step size within a short meta-training.
LOPT_HYPER = LoptHyper(exp_mult=1.0)


def meta_learner(algo: str, model, config):
    """The nn.Module whose parameters a MAML-family algorithm meta-trains."""
    if algo == "metasgd":
        return MetaSGD(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps)
    return MAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, first_order=(algo == "fomaml"))


def pretrain_loss(model, loss_fn, batch) -> torch.Tensor:
    """Loss of the plain model on all the examples of a task batch (its support and query sets, the task
    dimension flattened into the batch)."""
    pooled = tree_map(lambda s, q: torch.cat([s.flatten(0, 1), q.flatten(0, 1)]), batch.support, batch.query)
    return loss_fn(model, pooled)


def new_learned_optimizer(seed: int) -> LearnedOptimizer:
    return LearnedOptimizer(hyper=LOPT_HYPER, seed=seed)


def lopt_meta_loss(trainer: LearnedOptimizerTrainer, loss_fn, batch, K: int) -> torch.Tensor:
    return trainer.unroll(loss_fn, batch.support, K, query=batch.query, meta_loss="query").meta_loss


class Adapter:
    """One row of the table: how a method adapts the model to a batch of tasks, k = 0..K steps.

    ``adapt(loss_fn, support, K)`` yields, after each of k = 0..K steps, a function
    ``evaluate(metric_fn, query) -> [T]`` of the adapted weights (no graph kept)."""

    def __init__(self, name: str, adapt):
        self.name = name
        self._adapt = adapt

    def curves(self, loss_fn, batch, K: int, metrics: dict) -> dict[str, torch.Tensor]:
        """{metric name: [K + 1, T] values on the query sets after k = 0..K steps on the support sets}."""
        rows = {name: [] for name in metrics}
        for evaluate in self._adapt(loss_fn, batch.support, K):
            for name, fn in metrics.items():
                rows[name].append(evaluate(fn, batch.query))
        return {name: torch.stack(r) for name, r in rows.items()}


def fine_tune_adapter(name: str, model, optimizer: str, lr: float) -> Adapter:
    return maml_adapter(name, MAML(model, inner_lr=lr, inner_optimizer=optimizer))


def maml_adapter(name: str, learner: MAML) -> Adapter:
    def adapt(loss_fn, support, K):
        for k in range(K + 1):
            yield learner.adapt(loss_fn, support, steps=k).losses
    return Adapter(name, adapt)


def lopt_adapter(name: str, trainer: LearnedOptimizerTrainer) -> Adapter:
    def adapt(loss_fn, support, K):
        state = trainer.initial_state(task_count(support, "support"))
        for k in range(K + 1):
            if k > 0:
                state = trainer.unroll(loss_fn, support, 1, state=state, track_meta_gradient=False).state
            yield functools.partial(_evaluate, trainer.evaluator, state.fast)
    return Adapter(name, adapt)


def _evaluate(evaluator, fast, metric_fn, batch) -> torch.Tensor:
    with torch.no_grad():
        return evaluator.losses(metric_fn, fast, batch, fast.shape[0])
