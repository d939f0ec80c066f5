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

import torch
from torch.utils._pytree import tree_map

from ..learned_optimizer import LearnedOptimizer
from ..lopt_training import LearnedOptimizerTrainer
from ..maml import MAML, MetaSGD
from ..ops.learned_update import LoptHyper

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
    """One row of the table: how a method adapts the model to a batch of tasks, k = 0..K steps."""

    def __init__(self, name: str, curve_fn):
        self.name = name
        self._curve_fn = curve_fn

    def curve(self, loss_fn, batch, K: int) -> torch.Tensor:
        """[K + 1, T] query losses after k = 0..K adaptation steps on the support sets."""
        return self._curve_fn(loss_fn, batch, K)


def fine_tune_adapter(name: str, model, optimizer: str, lr: float) -> Adapter:
    learner = MAML(model, inner_lr=lr, inner_optimizer=optimizer)
    return maml_adapter(name, learner)


def maml_adapter(name: str, learner: MAML) -> Adapter:
    def curve(loss_fn, batch, K):
        return torch.stack([learner.adapt(loss_fn, batch.support, steps=k).losses(loss_fn, batch.query)
                            for k in range(K + 1)])
    return Adapter(name, curve)


def lopt_adapter(name: str, trainer: LearnedOptimizerTrainer, start: MAML) -> Adapter:
    def curve(loss_fn, batch, K):
        rows = [start.adapt(loss_fn, batch.support, steps=0).losses(loss_fn, batch.query)]
        state = None
        for _ in range(K):
            result = trainer.unroll(loss_fn, batch.support, 1, state=state, query=batch.query, meta_loss="query",
                                    track_meta_gradient=False)
            rows.append(result.losses[-1])
            state = result.state
        return torch.stack(rows)
    return Adapter(name, curve)
