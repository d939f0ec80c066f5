"""python -m metakernels bench: runs the checkout's benchmark tables, saves them and a chart."""
import json
import os
import subprocess
import sys

import pytest

from metakernels.cli.bench import chart_png, label_columns, ratio_columns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args, cwd):
    # Without the Triton interpreter that conftest turns on for the kernel tests (it would time Triton
    # on the CPU interpreter, minutes for a table).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "metakernels", "bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**env, "PYTHONPATH": REPO})


def test_columns_of_the_chart():
    header = ["hidden", "T x P", "implementation", "fwd ms", "fwd vs eager", "fwd+bwd ms", "fwd+bwd vs eager"]
    assert label_columns(header) == [0, 1, 2] and ratio_columns(header) == [4, 6]
    assert label_columns(["variant", "s / meta-step", "speed vs metakernels"]) == [0]
    table = {"title": "t", "header": header, "rows": [["4", "1x10", "eager", "1.0", "1.00x", "2.0", "1.00x"],
                                                      ["4", "1x10", "mk:cpu", "0.5", "2.00x", "1.0", "2.00x"]]}
    assert chart_png([table], "cpu").startswith(b"\x89PNG")


def test_bench_runs_a_table_and_saves_it(tmp_path):
    done = bench("--tables", "update", "--quick", "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "device:" in done.stdout and "torch" in done.stdout and "mk:cpu" in done.stdout
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert saved["environment"]["versions"]["torch"] and saved["tables"]
    table = saved["tables"][0]
    assert table["header"][:3] == ["op", "TxP", "variant"] and len(table["rows"]) >= 6
    assert (tmp_path / "b" / "bench.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, message", [
    (["--tables", "update,flash"], "--tables takes names from update, layers, lopt, maml, distributed"),
    (["--benchmarks", "/no/such/dir"], "/no/such/dir lacks update_table.py"),
    (["--out", "f"], "--out f is a file; expected a folder (it receives bench.json and bench.png)"),
    (["--out", "f/b"], "--out f/b: cannot create the folder: Not a directory"),
])
def test_bench_bad_arguments(tmp_path, args, message):
    """Each named before any table runs (a bad --out failed only after all of them)."""
    (tmp_path / "f").write_text("")
    done = bench(*args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "device:" not in done.stdout
