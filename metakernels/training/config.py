"""The settings of a training run, with the defaults of ``python -m metakernels train``.

The defaults meta-train the built-in character-level transformer LM (2 layers, d=64) on few-shot
language-modelling tasks from the standard library's docstrings: T=8 tasks per meta-step, 4 support and
4 query chunks of 48+1 characters, K=3 inner SGD steps.  See README.md for what they cost.
"""
from __future__ import annotations

import dataclasses
import math

from ..data.lm_tasks import check_seed
from ..data.text import positive_ints

ALGORITHMS = ("maml", "fomaml", "metasgd", "lopt")
TASKS = ("lm", "clinc", "labelled")
RESUMABLE_CHANGES = ("checkpoint_every",)  # the only setting that may differ when resuming a run


@dataclasses.dataclass
class TrainConfig:
    task: str = "lm"                 # lm (stdlib docstrings or --data folder of .txt domains), clinc, labelled
    data: str | None = None          # folder: CLINC150, .txt domains (lm) or <class>.txt files (labelled)
    algos: tuple[str, ...] = ("maml",)
    steps: int = 800                 # meta-steps per algorithm (and pretraining steps of the baseline)
    tasks_per_step: int = 8          # T
    inner_steps: int = 3             # K
    inner_lr: float = 0.3            # MAML's inner SGD rate (Meta-SGD's initial rates)
    meta_lr: float = 1e-3            # Adam on the meta-parameters (and on the pretrained baseline)
    lopt_meta_lr: float = 1e-2       # Adam on the learned optimizer's MLP
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 48                # LM chunk length (characters predicted per chunk); text length cap
    n_support: int = 4               # LM chunks per support set; classification: shots per class
    n_query: int = 4                 # per query set (per class for classification)
    n_way: int = 5                   # classification only
    eval_tasks: int = 64             # held-out meta-test tasks in the final table
    val_tasks: int = 32              # meta-validation tasks (baselines' learning rates; learning curves)
    val_every: int = 50
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        self.algos = tuple(self.algos)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task in ("clinc", "labelled") and self.data is None:
            raise ValueError(f"task {self.task!r} needs a data folder (--data PATH)")
        unknown = [a for a in self.algos if a not in ALGORITHMS]
        if not self.algos or unknown or len(set(self.algos)) != len(self.algos):
            raise ValueError(f"algos must be distinct names from {ALGORITHMS}, got {list(self.algos)}")
        counts = ("steps", "tasks_per_step", "inner_steps", "d_model", "n_heads", "n_layers", "seq_len", "n_support",
                  "n_query", "n_way", "eval_tasks", "val_tasks", "val_every", "checkpoint_every")
        for name, value in zip(counts, positive_ints(**{name: getattr(self, name) for name in counts})):
            setattr(self, name, value)
        self.seed = check_seed(self.seed)
        for name in ("inner_lr", "meta_lr", "lopt_meta_lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
