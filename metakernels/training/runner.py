"""The training run: pretraining (the baseline, and the learned optimizer's starting point), then each
meta-learner in ``config.algos``, each for ``config.steps`` steps on the same task batches, then the
evaluation of every method on the held-out meta-test tasks (see :mod:`.methods` for the rows).

Resuming is bit-for-bit: batch ``i`` is a pure function of (seed, i), torch's generator is reseeded
before every step, and the checkpoint (written atomically every ``checkpoint_every`` steps and at the
end of each phase) holds every module's and optimizer's state, each phase's step, and the loss history.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time

import torch
from tqdm import tqdm

from .. import distributed
from ..checkpoint import CheckpointError, load_checked, save_checked
from ..lopt_training import LearnedOptimizerTrainer
from ..maml import MAML
from ..tasks import select_tasks
from . import methods
from .config import RESUMABLE_CHANGES, TrainConfig
from .family import TaskFamily, build_family

CHECKPOINT_FILE = "checkpoint.mk"
_CHECKPOINT_KIND = "metakernels.train"


@dataclasses.dataclass
class RunResult:
    metrics: dict     # everything metrics.json holds
    curves: dict      # method name -> {metric: [K + 1, n_tasks]} on the meta-test tasks' query sets


class _Phase:
    """One thing trained for ``steps`` steps: the pretrained baseline or a meta-learner."""

    def __init__(self, name, module, optimizer, loss_fn, adapter):
        self.name, self.module, self.optimizer, self.loss_fn, self.adapter = name, module, optimizer, loss_fn, adapter
        self.step, self.history, self.val, self.seconds = 0, [], [], 0.0

    def state(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "history": list(self.history), "val": [list(v) for v in self.val], "seconds": self.seconds}

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], list(state["history"])
        self.val, self.seconds = [tuple(v) for v in state["val"]], state["seconds"]


def run(config: TrainConfig, out_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
        on_step=None, log=print) -> RunResult | None:
    """Trains and evaluates everything ``config`` asks for; writes the checkpoint under ``out_dir``.
    ``on_step(phase_name, step)`` is called after every step (tests use it to interrupt a run).

    Under torch.distributed (an initialised process group, e.g. from torchrun), every process trains on
    its share of each meta-batch's tasks (:func:`metakernels.distributed.local_tasks`) and the
    meta-gradients are all-reduced, so the trained modules are those of one process taking all the
    tasks (up to the order of float additions); only rank 0 validates, writes the checkpoint, evaluates
    and returns a result (the others return None).  A checkpoint resumes on any number of processes."""
    started = time.perf_counter()
    lead = distributed.rank() == 0
    log = log if lead else (lambda *args: None)
    progress = progress and lead
    checkpoint = None if out_dir is None else os.path.join(os.fspath(out_dir), CHECKPOINT_FILE)
    saved = _load_checkpoint(checkpoint, config) if resume else {}
    if checkpoint and not resume and os.path.exists(checkpoint):
        raise FileExistsError(f"{checkpoint} exists: pass --resume to continue that run, or choose another --out")
    family = build_family(config)
    log(f"tasks: {family.description}" + (f"; {distributed.world_size()} processes" if distributed.is_distributed() else ""))
    save_to = checkpoint if lead else None

    torch.manual_seed(config.seed)
    initial = family.make_model()
    phases = [_pretrain_phase(config, family, initial)]
    _train(phases[0], config, family, saved, phases, save_to, progress, on_step)
    for algo in config.algos:
        phases.append(_algo_phase(algo, config, family, initial, phases[0].module))
        _train(phases[-1], config, family, saved, phases, save_to, progress, on_step)
    if not lead:
        return None

    adapters = [p.adapter for p in phases[1:]]
    selected = {}
    for label, model, optimizer, grid in (("pretrained + SGD", phases[0].module, "sgd", methods.SGD_GRID),
                                          ("pretrained + Adam", phases[0].module, "adam", methods.ADAM_GRID),
                                          ("scratch + Adam", initial, "adam", methods.ADAM_GRID)):
        lr, scores = _select_rate(config, family, model, optimizer, grid)
        selected[label] = {"lr": lr, "val_loss_at_K": scores}
        adapters.append(methods.fine_tune_adapter(f"{label} (lr {lr:g})", model, optimizer, lr))
    log(f"evaluating {len(adapters)} methods on {config.eval_tasks} meta-test tasks")
    curves = {a.name: _curves(a, family, "test", config.eval_tasks, config, config.inner_steps, family.metrics())
              for a in adapters}
    metrics = {
        "config": config.to_dict(), "tasks": family.description, "splits": family.splits, "unit": family.loss_unit,
        "phases": {p.name: {"loss": p.history, "val": p.val, "seconds": p.seconds,
                            "tasks_per_second": p.step * config.tasks_per_step / max(p.seconds, 1e-9)}
                   for p in phases},
        "selected_rates": selected,
        "results": {name: {metric: _summary(c) for metric, c in by_metric.items()} for name, by_metric in curves.items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu"},
        "seconds": time.perf_counter() - started,
    }
    return RunResult(metrics, curves)


def _pretrain_phase(config, family, initial) -> _Phase:
    model = copy.deepcopy(initial)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.meta_lr)
    return _Phase("pretrain", model, optimizer, lambda batch: methods.pretrain_loss(model, family.loss_fn, batch),
                  methods.maml_adapter("pretrained, no adaptation", MAML(model)))


def _algo_phase(algo, config, family, initial, pretrained) -> _Phase:
    K = config.inner_steps
    if algo == "lopt":
        model = copy.deepcopy(pretrained)
        lopt = methods.new_learned_optimizer(config.seed)
        trainer = LearnedOptimizerTrainer(lopt, model)
        optimizer = torch.optim.Adam(lopt.parameters(), lr=config.lopt_meta_lr)
        adapter = methods.lopt_adapter("pretrained + learned optimizer", trainer)
        return _Phase(algo, lopt, optimizer, lambda batch: methods.lopt_meta_loss(trainer, family.loss_fn, batch, K),
                      adapter)
    learner = methods.meta_learner(algo, copy.deepcopy(initial), config)
    optimizer = torch.optim.Adam(learner.parameters(), lr=config.meta_lr)
    label = {"maml": "MAML", "fomaml": "first-order MAML", "metasgd": "Meta-SGD"}[algo]
    return _Phase(algo, learner, optimizer, lambda batch: learner(family.loss_fn, batch.support, batch.query),
                  methods.maml_adapter(f"{label} (K={K} SGD steps)", learner))


def _train(phase, config, family, saved, phases, checkpoint, progress, on_step) -> None:
    if phase.name in saved:
        phase.load(saved[phase.name])
    T = config.tasks_per_step
    share = distributed.local_tasks(T)
    weight = (share.stop - share.start) / T
    parameters = [p for group in phase.optimizer.param_groups for p in group["params"]]
    lead = distributed.rank() == 0
    bar = tqdm(total=config.steps * T, initial=phase.step * T, unit="task", desc=phase.name, disable=not progress,
               dynamic_ncols=True)
    with bar:
        while phase.step < config.steps:
            tick = time.perf_counter()
            torch.manual_seed(_step_seed(config.seed, phase.name, phase.step))
            batch = family.samplers["train"].batch(phase.step, T)
            if share != slice(0, T):
                batch = dataclasses.replace(batch, support=select_tasks(batch.support, share),
                                            query=select_tasks(batch.query, share))
            loss = phase.loss_fn(batch)
            phase.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients(parameters, weight)
            phase.optimizer.step()
            phase.history.append(distributed.all_reduce_mean(loss, weight).item())
            phase.step += 1
            phase.seconds += time.perf_counter() - tick
            if lead and (phase.step % config.val_every == 0 or phase.step == config.steps):
                phase.val.append((phase.step, _validation_loss(phase, family, config)))
            bar.update(T)
            bar.set_postfix(loss=f"{phase.history[-1]:.3f}", val=f"{phase.val[-1][1]:.3f}" if phase.val else "-")
            if checkpoint and (phase.step % config.checkpoint_every == 0 or phase.step == config.steps):
                _save_checkpoint(checkpoint, config, phases)
            if on_step is not None:
                on_step(phase.name, phase.step)


def _step_seed(seed: int, phase: str, step: int) -> int:
    return (seed * 1_000_003 + sum(map(ord, phase)) * 10_007 + step) % (2 ** 63)


def _validation_loss(phase, family, config) -> float:
    """Mean query loss on the meta-validation tasks after K steps of the phase's own adaptation (for the
    pretrained model, without adaptation: its training objective)."""
    K = 0 if phase.name == "pretrain" else config.inner_steps
    curves = _curves(phase.adapter, family, "val", config.val_tasks, config, K, {"loss": family.loss_fn})
    return curves["loss"][-1].mean().item()


def _select_rate(config, family, model, optimizer, grid):
    """The rate of ``grid`` with the lowest mean query loss after K steps on the meta-validation tasks."""
    scores = {}
    for lr in grid:
        learner = MAML(model, inner_lr=lr, inner_steps=config.inner_steps, inner_optimizer=optimizer)
        losses = torch.cat([learner.adapt(family.loss_fn, b.support).losses(family.loss_fn, b.query)
                            for b in _batches(family, "val", config.val_tasks, config)])
        scores[lr] = losses.mean().item() if torch.isfinite(losses).all() else math.inf
    return min(scores, key=scores.get), scores


def _batches(family, split, n_tasks, config):
    T = config.tasks_per_step
    return [family.samplers[split].batch(i, min(T, n_tasks - i * T)) for i in range(math.ceil(n_tasks / T))]


def _curves(adapter, family: TaskFamily, split: str, n_tasks: int, config, K: int, metrics: dict) -> dict:
    """{metric: [K + 1, n_tasks]} on the query sets of ``split``'s first n_tasks tasks after 0..K steps."""
    parts = [adapter.curves(family.loss_fn, b, K, metrics) for b in _batches(family, split, n_tasks, config)]
    return {name: torch.cat([p[name] for p in parts], dim=1) for name in metrics}


def _summary(curves: torch.Tensor) -> dict:
    """Mean and 95% interval (1.96 standard errors) over tasks, after each k = 0..K."""
    n = curves.shape[1]
    half = 1.96 * curves.std(dim=1) / math.sqrt(n) if n > 1 else torch.full((curves.shape[0],), math.nan)
    return {"mean": curves.mean(dim=1).tolist(), "ci95": half.tolist(), "tasks": n}


def _save_checkpoint(path, config, phases) -> None:
    save_checked(path, _CHECKPOINT_KIND, {"config": config.to_dict(), "phases": {p.name: p.state() for p in phases}})


def _load_checkpoint(path, config) -> dict:
    if path is None:
        raise ValueError("resume needs an output folder (--out) holding the checkpoint")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    _, saved = load_checked(path, _CHECKPOINT_KIND)
    ours, theirs = config.to_dict(), saved["config"]
    differ = [k for k in ours if k not in RESUMABLE_CHANGES and ours[k] != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {ours[k]!r}" for k in differ)
        raise CheckpointError(f"{path}: the run was started with other settings ({shown}); resume with the same ones")
    return saved["phases"]
