"""``python -m metakernels bench``: runs the benchmark tables of a source checkout (``benchmarks/``:
the fused update ops, the learned-optimizer step, second-order MAML against its peers, task-parallel
scaling over processes) on this machine,
prints them under a line naming the device and versions, and saves them as bench.json and a bar chart
of every table's ratio columns ("... vs eager", "speed vs ...") as bench.png under --out."""
from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
import tempfile

from ..checkpoint import atomic_write_bytes, atomic_write_text
from .out_folder import prepare_out_folder

TABLES = {"update": "update_table.py", "layers": "layers_table.py", "lopt": "lopt_table.py", "maml": "maml_table.py",
          "distributed": "distributed_scaling.py"}
PEERS = ("higher", "torchopt", "learn2learn", "triton")
_TABLES_ENV = "METAKERNELS_BENCH_TABLES"  # benchmarks/harness.py appends each printed table here


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="kernel and end-to-end benchmark tables for this machine",
                            description=__doc__)
    p.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated, from {', '.join(TABLES)}")
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes instead of ~30)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.png")
    p.add_argument("--benchmarks", default=None, help="the benchmarks/ folder (default: the checkout's)")
    p.set_defaults(handler=main)


def environment() -> dict:
    import torch

    from .. import backend_info

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in PEERS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine())
    return {"device": device, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "versions": versions,
            "backends": backend_info()}


def main(args) -> int:
    folder = args.benchmarks or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks")
    names = [t.strip() for t in args.tables.split(",") if t.strip()]
    unknown = [t for t in names if t not in TABLES]
    if unknown or not names:
        print(f"error: --tables takes names from {', '.join(TABLES)}, got {args.tables!r}", file=sys.stderr)
        return 2
    missing = [TABLES[t] for t in names if not os.path.exists(os.path.join(folder, TABLES[t]))]
    if missing:
        print(f"error: {folder} lacks {', '.join(missing)}: bench runs the benchmark scripts of a source checkout "
              "(pass --benchmarks PATH)", file=sys.stderr)
        return 2
    problem = prepare_out_folder(args.out, "bench.json and bench.png")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    env_info = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env_info["versions"].items())
    print(f"device: {env_info['device']} ({env_info['cpus']} CPUs, {env_info['threads']} torch threads); {versions}",
          flush=True)
    tables, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        sink = os.path.join(tmp, "tables.jsonl")
        for name in names:
            print(f"\n== {name}: {TABLES[name]}{' --quick' if args.quick else ''}", flush=True)
            command = [sys.executable, os.path.join(folder, TABLES[name])] + (["--quick"] if args.quick else [])
            if subprocess.run(command, env={**os.environ, _TABLES_ENV: sink}).returncode != 0:
                failed.append(name)
        if os.path.exists(sink):
            with open(sink, encoding="utf-8") as f:
                tables = [json.loads(line) for line in f]
    atomic_write_text(os.path.join(args.out, "bench.json"),
                      json.dumps({"environment": env_info, "tables": tables}, indent=1) + "\n")
    if tables:
        atomic_write_bytes(os.path.join(args.out, "bench.png"), chart_png(tables, env_info["device"]))
    print(f"\nwrote {args.out}/bench.json" + (f" and {args.out}/bench.png" if tables else ""))
    if failed:
        print(f"error: {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    return 0


def ratio_columns(header: list[str]) -> list[int]:
    return [i for i, h in enumerate(header) if " vs " in h]


def label_columns(header: list[str]) -> list[int]:
    """The leading columns that name a row (before the first measured quantity)."""
    measured = ("ms", "GB", "GFLOP", "MB", "%", " vs ", "s /")
    keys = []
    for i, h in enumerate(header):
        if any(m in h for m in measured):
            break
        keys.append(i)
    return keys


def chart_png(tables: list[dict], device: str) -> bytes:
    """One panel per table: horizontal bars of its ratio columns ("1.23x"), one bar group per row
    (labelled by the row's leading text columns); a dashed line marks 1x."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = [t for t in tables if ratio_columns(t["header"]) and t["rows"]]
    fig = Figure(figsize=(11, 1.5 + sum(0.28 * len(t["rows"]) * len(ratio_columns(t["header"])) + 1 for t in panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0] if panels else []
    for ax, table in zip(axes, panels):
        columns = ratio_columns(table["header"])
        keys = label_columns(table["header"])
        labels = [" ".join(row[i] for i in keys) for row in table["rows"]]
        height = 0.8 / len(columns)
        for j, col in enumerate(columns):
            values = [_ratio(row[col]) for row in table["rows"]]
            positions = [i + j * height for i in range(len(values))]
            ax.barh(positions, values, height=height, label=table["header"][col])
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.axvline(1.0, color="k", linestyle="--", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_title(table["title"] or "benchmark", fontsize=9)
        ax.set_xlabel("ratio (higher is faster)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"metakernels bench on {device}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _ratio(cell: str) -> float:
    try:
        return float(cell.rstrip("x"))
    except ValueError:
        return 0.0

