"""The learned optimizer's Triton kernels compile for an H100/H200 (sm_90) on this GPU-less machine, for
every dtype and for one, two and three hidden layers (tests/triton_sm90_compile.py says why and how)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = {"_moments_kernel", "_step_kernel", "_backward_kernel", "_normaliser_kernel"}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_learned_optimizer_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90_compile.py")], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    failures = [r for r in results if r["error"]]
    assert not failures, "\n".join(f"{r['kernel']} ({r['case']}): {r['error']}" for r in failures)
    cases = {r["case"] for r in results}
    assert len(cases) == 9
    assert all({r["kernel"] for r in results if r["case"] == case} == KERNELS for case in cases)
