"""A task family: the disjoint meta-train / meta-validation / meta-test samplers, the model to train
and its per-task loss."""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from ..data import EpisodeSampler, LMTaskSampler, folder_domains, load_clinc150, load_labelled_folder, split_domains
from ..data.text import DataError, VOCAB_SIZE, stdlib_domains, subset
from ..models import TransformerClassifier, TransformerLM, classification_accuracy, classification_loss, lm_loss
from .config import TrainConfig

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class TaskFamily:
    description: str
    samplers: dict            # split -> LMTaskSampler | EpisodeSampler (disjoint domains or classes)
    splits: dict              # split -> the domain (or class group) names
    make_model: Callable[[], nn.Module]
    loss_fn: Callable
    loss_unit: str            # what the reported loss is measured in
    extra_metrics: dict = dataclasses.field(default_factory=dict)   # name -> fn(f, batch) -> scalar, reported too

    def metrics(self) -> dict:
        return {"loss": self.loss_fn, **self.extra_metrics}


def build_family(config: TrainConfig) -> TaskFamily:
    """The task family of ``config``; a DataError names the data folder (or the built-in text) and the problem."""
    try:
        return _lm_family(config) if config.task == "lm" else _classification_family(config)
    except DataError as e:
        source = config.data or "the standard-library docstrings"
        raise DataError(str(e) if str(e).startswith(str(source)) else f"{source}: {e}") from None


def _lm_family(config: TrainConfig) -> TaskFamily:
    if config.data is None:
        domains, source = stdlib_domains(), "standard-library docstrings"
    else:
        domains, source = folder_domains(config.data), f"text domains of {config.data}"
    splits = split_domains(domains, seed=config.seed)
    samplers = {split: LMTaskSampler(subset(domains, splits[split]), config.n_support, config.n_query,
                                     config.seq_len, seed=config.seed * 10 + i)
                for i, split in enumerate(SPLITS)}

    def make_model():
        return TransformerLM(VOCAB_SIZE, config.d_model, config.n_heads, config.n_layers, max_len=config.seq_len)

    counts = "/".join(str(len(splits[s])) for s in SPLITS)
    return TaskFamily(f"few-shot LM on {source} ({counts} train/val/test domains)", samplers, splits,
                      make_model, _bits(lm_loss), "bits per character")


def _classification_family(config: TrainConfig) -> TaskFamily:
    if config.task == "clinc":
        classes, groups = load_clinc150(config.data)
        splits = split_domains(groups, seed=config.seed)
        members = {s: [c for g in splits[s] for c in groups[g]] for s in SPLITS}
        source = f"CLINC150 intents of {config.data} (class-disjoint by domain)"
    else:
        classes = load_labelled_folder(config.data)
        splits = split_domains(classes, seed=config.seed)
        members = splits
        source = f"labelled texts of {config.data} (class-disjoint)"
    for split in SPLITS:
        if len(members[split]) < config.n_way:
            raise DataError(f"the meta-{split} split has {len(members[split])} classes, fewer than n_way={config.n_way}")
    samplers = {split: EpisodeSampler({c: classes[c] for c in members[split]}, config.n_way, config.n_support,
                                      config.n_query, config.seq_len, seed=config.seed * 10 + i)
                for i, split in enumerate(SPLITS)}

    def make_model():
        return TransformerClassifier(config.n_way, VOCAB_SIZE, config.d_model, config.n_heads, config.n_layers,
                                     max_len=config.seq_len)

    return TaskFamily(f"{config.n_way}-way {config.n_support}-shot episodes of {source}", samplers, splits,
                      make_model, _bits(classification_loss), "bits per example",
                      {"accuracy": classification_accuracy})


def _bits(loss_fn):
    """The loss in bits (nats / ln 2): the same minimiser, the unit the table reports."""
    def bits(f, batch):
        return loss_fn(f, batch) * 1.4426950408889634
    bits.__name__ = f"{loss_fn.__name__}_bits"
    return bits
