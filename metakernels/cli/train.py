"""``python -m metakernels train``: meta-train, train the baselines, print the meta-test table, and write
metrics.json, curves.png and checkpoint.mk under --out."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .. import distributed
from ..checkpoint import CheckpointError
from ..data import DataError
from ..training import ALGORITHMS, TASKS, TrainConfig, run
from ..training.report import METRICS_FILE, PLOT_FILE, format_table, write_outputs
from .out_folder import prepare_out_folder

_HELP = {
    "steps": "meta-steps per algorithm, and pretraining steps of the baseline",
    "tasks_per_step": "T, tasks per meta-step",
    "inner_steps": "K, adaptation steps",
    "inner_lr": "MAML's inner SGD rate (Meta-SGD's initial rates)",
    "meta_lr": "Adam rate of the meta-learners and of pretraining",
    "lopt_meta_lr": "Adam rate of the learned optimizer's MLP",
    "d_model": "width of the built-in transformer (a multiple of --n-heads)",
    "n_heads": "attention heads per layer",
    "n_layers": "transformer blocks",
    "seq_len": "characters predicted per LM chunk; text length cap for classification",
    "n_support": "support chunks per LM task; shots per class for classification",
    "n_query": "query chunks per LM task; query texts per class for classification",
    "n_way": "classes per episode (classification)",
    "eval_tasks": "meta-test tasks in the final table",
    "val_tasks": "meta-validation tasks (baselines' rates, learning curves)",
    "val_every": "meta-steps between validation losses (the learning curves)",
    "checkpoint_every": "meta-steps between checkpoints (--resume continues from the last)",
    "seed": "seed of the initialisation, the task sampling and every step's randomness",
}


def add_parser(commands) -> None:
    defaults = TrainConfig()
    p = commands.add_parser("train", help="meta-train and compare with baselines on held-out tasks",
                            description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=TASKS, default=defaults.task,
                   help="lm: few-shot language modelling (stdlib docstrings, or --data folder of .txt domains); "
                        "clinc: CLINC150 intent episodes (--data folder); labelled: --data folder of <class>.txt")
    p.add_argument("--data", default=None, help="data folder (see --task)")
    p.add_argument("--algo", default=",".join(defaults.algos),
                   help=f"comma-separated meta-learners from {', '.join(ALGORITHMS)}")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("task", "data", "algos"):
            continue
        p.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                       default=getattr(defaults, field.name), help=_HELP.get(field.name, " "))
    p.add_argument("--out", default="runs/train", help="output folder: metrics.json, curves.png, checkpoint.mk")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, torch's own number when not given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=main)


def main(args) -> int:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            return _fail(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("algos",)}
    try:
        config = TrainConfig(**values, algos=tuple(a.strip() for a in args.algo.split(",") if a.strip()))
    except ValueError as e:
        return _fail(str(e))
    problem = prepare_out_folder(args.out, f"{METRICS_FILE}, {PLOT_FILE} and the checkpoint")
    if problem:
        return _fail(problem)
    process_group = _join_process_group()
    try:
        distributed.local_tasks(config.tasks_per_step)
    except ValueError as e:
        return _fail(str(e))
    try:
        result = run(config, args.out, resume=args.resume, progress=not args.no_progress)
        if process_group:  # NOTE: a rank tearing gloo down while another is still connected sometimes aborts
            torch.distributed.barrier()
    except (DataError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        return _fail(str(e))
    finally:
        if process_group:
            torch.distributed.destroy_process_group()
    if result is None:  # a process other than rank 0 of a distributed run
        return 0
    write_outputs(args.out, result.metrics)
    print()
    print(format_table(result.metrics))
    print(f"\n{result.metrics['seconds']:.0f} s; wrote {args.out}/{METRICS_FILE}, {args.out}/{PLOT_FILE} and the checkpoint")
    return 0


def _join_process_group() -> bool:
    """Under torchrun (WORLD_SIZE > 1), joins the process group (gloo: the run is on CPU)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
