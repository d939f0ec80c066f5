"""The dispatch point: automatic choice, forcing, reporting, and the missing-extension fallback."""
import os
import subprocess
import sys

import pytest
import torch

import metakernels as mk
from metakernels import _backend


def test_backend_info_reports_every_backend_with_a_reason():
    info = mk.backend_info()
    assert set(info["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert info["backends"]["reference"]["available"]
    for entry in info["backends"].values():
        assert entry["reason"]
    assert info["default"]["cpu"] in ("cpu", "reference", "triton")


def test_cpu_tensors_use_the_compiled_cpu_backend_when_built():
    expected = "cpu" if _backend.extension() is not None else "reference"
    assert _backend.select(torch.device("cpu"), "test") == expected


def test_forced_backend_that_is_unavailable_raises():
    x = torch.randn(5)
    if not torch.cuda.is_available():
        with mk.use_backend("cuda"), pytest.raises(mk.BackendUnavailableError, match="'cuda' was forced but is unavailable: (no CUDA device|metakernels._C was built without CUDA)"):
            mk.ops.sgd_update(x, x, 0.1)
    with mk.use_backend("cpu"), pytest.raises(mk.BackendUnavailableError, match="inputs are on meta"):
        mk.ops.sgd_update(x.to("meta"), x.to("meta"), 0.1)


def test_environment_variable_forces_and_is_validated(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.select(torch.device("cpu"), "test") == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="METAKERNELS_BACKEND='fastest'"):
        _backend.select(torch.device("cpu"), "test")
    with pytest.raises(ValueError, match="unknown backend"):
        with mk.use_backend("gpu"):
            pass


def test_missing_extension_warns_once_and_reference_serves():
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['metakernels._C'] = None\n"  # makes `import metakernels._C` raise ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import metakernels as mk\n"
        "    import metakernels.ops\n"
        "    x = torch.randn(3, 5)\n"
        "    out = mk.ops.sgd_update(x, x, 0.5)\n"
        "msgs = [str(w.message) for w in caught if 'metakernels' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'reference' in msgs[0] and 'pip install' in msgs[0]\n"
        "assert torch.allclose(out, 0.5 * x)\n"
        "info = mk.backend_info()\n"
        "assert not info['backends']['cpu']['available'] and 'not loaded' in info['backends']['cpu']['reason']\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != _backend.ENV_VAR}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
