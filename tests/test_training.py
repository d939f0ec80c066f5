"""The main job: python -m metakernels train (runner, resume, outputs, CLI errors), on tiny settings."""
import json
import os
import subprocess
import sys

import pytest
import torch

from metakernels.checkpoint import CheckpointError, load_checked
from metakernels.data import DataError
from metakernels.training import TrainConfig, run
from metakernels.training.family import build_family
from metakernels.training.report import format_table, plot_png

CLINC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "clinc150")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(steps=4, tasks_per_step=2, inner_steps=2, d_model=16, n_heads=2, n_layers=1, seq_len=12, n_support=2,
            n_query=2, eval_tasks=4, val_tasks=2, val_every=2, checkpoint_every=2)
TINY_ARGS = ["--steps", "2", "--tasks-per-step", "2", "--inner-steps", "1", "--d-model", "16", "--n-heads", "2",
             "--n-layers", "1", "--seq-len", "12", "--n-support", "2", "--n-query", "2", "--eval-tasks", "4",
             "--val-tasks", "2", "--no-progress", "--threads", "1"]


def losses(result):
    return {name: (p["loss"], p["val"]) for name, p in result.metrics["phases"].items()}


@pytest.mark.parametrize("stop_at", [("pretrain", 3), ("maml", 3), ("lopt", 1)])
def test_resume_continues_bit_for_bit(tmp_path, text_folder, stop_at):
    config = TrainConfig(**TINY, data=text_folder, algos=("maml", "lopt"))
    whole = run(config, tmp_path / "whole", progress=False, log=lambda *a: None)

    def interrupt(phase, step):
        if (phase, step) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, tmp_path / "cut", progress=False, on_step=interrupt, log=lambda *a: None)
    resumed = run(config, tmp_path / "cut", resume=True, progress=False, log=lambda *a: None)
    assert losses(resumed) == losses(whole)
    assert resumed.metrics["results"] == whole.metrics["results"]
    assert all(torch.equal(resumed.curves[k]["loss"], whole.curves[k]["loss"]) for k in whole.curves)


def test_same_seed_same_losses_and_another_seed_differs(text_folder):
    config = TrainConfig(**TINY, data=text_folder, algos=("metasgd",))
    first = run(config, progress=False, log=lambda *a: None)
    assert losses(run(config, progress=False, log=lambda *a: None)) == losses(first)
    other = run(TrainConfig(**{**TINY, "seed": 1}, data=text_folder, algos=("metasgd",)), progress=False,
                log=lambda *a: None)
    assert losses(other) != losses(first)


def test_table_rows_and_metrics(text_folder):
    result = run(TrainConfig(**TINY, data=text_folder, algos=("fomaml", "metasgd", "lopt")), progress=False,
                 log=lambda *a: None)
    names = list(result.metrics["results"])
    assert names[:3] == ["first-order MAML (K=2 SGD steps)", "Meta-SGD (K=2 SGD steps)", "pretrained + learned optimizer"]
    assert [n.split(" (lr")[0] for n in names[3:]] == ["pretrained + SGD", "pretrained + Adam", "scratch + Adam"]
    for name, r in result.metrics["results"].items():
        assert list(r) == ["loss"]
        r = r["loss"]
        assert len(r["mean"]) == 3 and r["tasks"] == 4 and all(v > 0 for v in r["mean"])
        curve = result.curves[name]["loss"].double()
        assert torch.allclose(torch.tensor(r["mean"], dtype=torch.float64), curve.mean(dim=1), rtol=1e-6)
    pre = result.metrics["results"]
    # the learned optimizer and the fine-tuning baselines start from the pretrained model
    assert pre[names[2]]["loss"]["mean"][0] == pytest.approx(pre[names[3]]["loss"]["mean"][0])
    table = format_table(result.metrics)
    assert all(name in table for name in names) and "bits per character" in table
    assert plot_png(result.metrics).startswith(b"\x89PNG")
    rates = result.metrics["selected_rates"]
    assert all(r["lr"] == min(r["val_loss_at_K"], key=r["val_loss_at_K"].get) for r in rates.values())


def test_resume_refuses_other_settings_and_run_refuses_to_overwrite(tmp_path, text_folder):
    config = TrainConfig(**TINY, data=text_folder)
    run(config, tmp_path, progress=False, log=lambda *a: None)
    with pytest.raises(FileExistsError, match="pass --resume"):
        run(config, tmp_path, progress=False, log=lambda *a: None)
    with pytest.raises(CheckpointError, match="inner_lr: checkpoint 0.3, now 0.1"):
        run(TrainConfig(**TINY, data=text_folder, inner_lr=0.1), tmp_path, resume=True, progress=False,
            log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(config, tmp_path / "empty", resume=True, progress=False, log=lambda *a: None)
    meta, state = load_checked(tmp_path / "checkpoint.mk", "metakernels.train")
    assert state["phases"]["maml"]["step"] == 4 and state["config"]["data"] == text_folder


@pytest.mark.parametrize("field, value, message", [
    ("algos", ("maml", "adam"), "algos must be distinct names"), ("steps", 0, "steps must be an int >= 1"),
    ("task", "vision", "task must be one of"), ("inner_lr", -1.0, "inner_lr must be a finite number > 0"),
    ("meta_lr", float("inf"), "meta_lr must be a finite number > 0, got inf"),
    ("d_model", 30, "d_model=30 must be divisible by n_heads=4"),
])
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.skipif(not os.path.exists(os.path.join(CLINC, "data_full.json")), reason=f"CLINC150 is not at {CLINC}")
def test_clinc_episodes_train_with_class_disjoint_splits():
    config = TrainConfig(**{**TINY, "n_support": 1, "seq_len": 24}, task="clinc", data=CLINC, n_way=3)
    family = build_family(config)
    members = [set(family.samplers[s].names) for s in ("train", "val", "test")]
    assert not (members[0] & members[1] or members[0] & members[2] or members[1] & members[2])
    assert sum(map(len, members)) == 150
    result = run(config, progress=False, log=lambda *a: None)
    assert result.metrics["unit"] == "bits per example"
    for name, r in result.metrics["results"].items():
        assert len(r["loss"]["mean"]) == 3 and len(r["accuracy"]["mean"]) == 3
        accuracy = result.curves[name]["accuracy"]
        assert ((accuracy * 6).round() == accuracy * 6).all() and accuracy.min() >= 0 and accuracy.max() <= 1
    table = format_table(result.metrics)
    assert "accuracy after K=2" in table and "fraction correct" in table


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "metakernels", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_train_writes_table_metrics_plot_and_checkpoint(tmp_path, text_folder):
    out = tmp_path / "out"
    done = cli("train", *TINY_ARGS, "--data", text_folder, "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "loss before" in done.stdout and "MAML (K=1 SGD steps)" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["steps"] == 2 and set(metrics["phases"]) == {"pretrain", "maml"}
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    again = cli("train", *TINY_ARGS, "--data", text_folder, "--out", str(out), "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "metrics.json").read_text())["results"] == metrics["results"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("args, message", [
    (["--algo", "maml,reptile"], "algos must be distinct names"),
    (["--task", "clinc"], "task 'clinc' needs a data folder"),
    (["--data", "/no/such/folder"], "/no/such/folder: not a folder"),
    (["--steps", "0"], "steps must be an int >= 1"),
    (["--resume"], "no checkpoint to resume from"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--n-support", "500"], "the standard-library docstrings: "),
])
def test_cli_bad_arguments_exit_2_with_the_reason(tmp_path, args, message):
    """(--n-support 500: chunks a domain cannot hold; the message names the text and the domains.)"""
    done = cli("train", *args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_cli_an_out_that_cannot_be_a_folder_exits_2_before_training(tmp_path, where):
    """Named before anything runs (before: a file as --out failed at the first checkpoint, after minutes of
    training, and a path under a file ended in a traceback)."""
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" if where == "a_file" else tmp_path / "f" / "out"
    done = cli("train", "--out", str(out), cwd=tmp_path)
    message = "is a file; expected a folder" if where == "a_file" else "cannot create the folder: Not a directory"
    assert done.returncode == 2 and f"--out {out}" in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "tasks:" not in done.stdout


def test_every_command_line_option_says_what_it_is():
    """Each option of train and bench has a help text (argparse otherwise prints a bare name)."""
    import argparse

    from metakernels.cli import bench, train

    commands = argparse.ArgumentParser().add_subparsers()
    train.add_parser(commands)
    bench.add_parser(commands)
    bare = [f"{name} {action.option_strings[0]}" for name, parser in commands.choices.items()
            for action in parser._actions if action.option_strings and not (action.help or "").strip()]
    assert not bare, f"options without help: {bare}"


def test_too_small_data_names_the_folder_and_domain(tmp_path, text_folder):
    with pytest.raises(DataError, match=f"{text_folder}: [0-9] domain\\(s\\) are too small for 200 support"):
        run(TrainConfig(**{**TINY, "n_support": 200}, data=text_folder), progress=False, log=lambda *a: None)
