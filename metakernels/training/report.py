"""What a run leaves behind: the final table (printed), ``metrics.json`` and ``curves.png`` (both
written atomically)."""
from __future__ import annotations

import io
import json
import os

from ..checkpoint import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.json"
PLOT_FILE = "curves.png"


def format_table(metrics: dict) -> str:
    """Query loss (and any other metric) before adaptation and after K steps on the meta-test tasks,
    mean +- 95% interval over tasks, best loss after K steps first."""
    K = metrics["config"]["inner_steps"]
    results = metrics["results"]
    names = list(next(iter(results.values())))
    width = max(len(name) for name in results) + 2
    n = next(iter(results.values()))["loss"]["tasks"]
    unit = {"loss": metrics["unit"], "accuracy": "fraction correct"}
    lines = [f"Meta-test: {n} tasks from held-out domains, query sets; "
             + "; ".join(f"{m} in {unit.get(m, m)}" for m in names)
             + " (mean +- 95% interval over tasks)",
             f"{'method':<{width}}" + "".join(f"{f'{m} before':>20}{f'{m} after K={K}':>20}" for m in names)]
    ranked = sorted(results.items(), key=lambda item: item[1]["loss"]["mean"][-1])
    for name, r in ranked:
        lines.append(f"{name:<{width}}" + "".join(f"{_cell(r[m], 0):>20}{_cell(r[m], -1):>20}" for m in names))
    lines.append(f"lowest query loss after K steps: {ranked[0][0]}")
    return "\n".join(lines)


def _cell(summary: dict, k: int) -> str:
    return f"{summary['mean'][k]:.3f} +- {summary['ci95'][k]:.3f}"


def write_outputs(out_dir: str | os.PathLike, metrics: dict) -> None:
    atomic_write_text(os.path.join(out_dir, METRICS_FILE), json.dumps(metrics, indent=1) + "\n")
    atomic_write_bytes(os.path.join(out_dir, PLOT_FILE), plot_png(metrics))


def plot_png(metrics: dict) -> bytes:
    """Two panels: the training curves of every phase (loss per step, smoothed, and the
    meta-validation loss) and the adaptation curves of every method on the meta-test tasks."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100)
    train, adapt = fig.subplots(1, 2)
    for i, (name, phase) in enumerate(metrics["phases"].items()):
        color = f"C{i}"
        losses = phase["loss"]
        window = max(1, len(losses) // 30)
        smooth = [sum(losses[max(0, j - window + 1):j + 1]) / len(losses[max(0, j - window + 1):j + 1])
                  for j in range(len(losses))]
        train.plot(range(1, len(losses) + 1), smooth, color=color, alpha=0.6, label=f"{name}: training loss")
        if phase["val"]:
            steps, values = zip(*phase["val"])
            train.plot(steps, values, "o--", color=color, label=f"{name}: meta-validation")
    train.set(xlabel="step", ylabel=f"loss ({metrics['unit']})", title="training")
    train.legend(fontsize=7)
    for i, (name, r) in enumerate(metrics["results"].items()):
        loss = r["loss"]
        adapt.errorbar(range(len(loss["mean"])), loss["mean"], yerr=loss["ci95"], marker="o", capsize=3,
                       color=f"C{i}", label=name)
    adapt.set(xlabel="adaptation step k", ylabel=f"query loss ({metrics['unit']})",
              title=f"meta-test adaptation ({next(iter(metrics['results'].values()))['loss']['tasks']} tasks)")
    adapt.set_xticks(range(metrics["config"]["inner_steps"] + 1))
    adapt.set_yscale("log")
    adapt.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
