"""Shared test setup: Triton runs under its CPU interpreter when there is no GPU (the variable must be
set before triton is imported), and every kernel output is poisoned with NaN before it is written."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import metakernels as mk  # noqa: E402
from metakernels import _backend  # noqa: E402

# tests/cuda_emulation's emulate module, for the fixtures below and the emulated tests' own imports.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))
import emulate  # noqa: E402

_backend.set_poison_outputs(True)


def pytest_runtest_logreport(report):
    """With $METAKERNELS_FAILURE_LOG set, each failure is appended to that file as it happens, so that a run
    cut short (a timeout on a lent GPU machine) still names its failures.  Under pytest-xdist only the
    controller writes."""
    path = os.environ.get("METAKERNELS_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n\n")


def _device_for(backend: str) -> torch.device:
    if backend == "cuda":
        return torch.device("cuda")
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def backend_params():
    """One pytest param per backend; unavailable ones skip with the reason backend_info gives."""
    params = []
    for name in _backend.BACKENDS:
        reason = _backend._why_unavailable(name, _device_for(name))
        marks = [pytest.mark.skip(reason=f"{name} backend unavailable here: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend(request):
    """(name, device) of a backend available on this machine, forced for the test's duration."""
    with mk.use_backend(request.param):
        yield request.param, _device_for(request.param)


@pytest.fixture(scope="session")
def cuda_emulation():
    """The functions of metakernels._C for the op families with CUDA kernels, built with those kernels compiled
    for the CPU (tests/cuda_emulation), once per session."""
    if _backend.extension() is None:
        pytest.skip("the compiled extension metakernels._C is not built")
    return emulate.build()


@pytest.fixture
def emulated_cuda_kernels(cuda_emulation, monkeypatch):
    """(name, device) as the `backend` fixture gives them: the cpu backend, forced for the test's duration, with
    the emulated CUDA kernels in place of its own (metakernels._backend.extension() returns them)."""
    with_emulated_cuda = emulate.WithEmulatedCuda(cuda_emulation, _backend.extension())
    monkeypatch.setattr(_backend, "extension", lambda: with_emulated_cuda)
    with mk.use_backend("cpu"):
        yield "cpu", torch.device("cpu")


def triton_interpreted(backend_name: str) -> bool:
    return backend_name == "triton" and not torch.cuda.is_available()


def ops_run(fn):
    """fn's result and, in order, every ATen op it ran as (name of its overload packet, the OpOverload, its
    tensor outputs): what tests count products, allocations and written elements with.  Products run as
    torch.bmm / torch.baddbmm here (metakernels.ops.matmul's "blas" policy), so that they are counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from metakernels.ops.matmul import use_policy

    ran = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            ran.append((func.overloadpacket.__name__, func, outputs))
            return out

    with use_policy("blas"), Record():
        result = fn()
    return result, ran


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A folder of six small text domains (one .txt file each) for the training and distributed tests."""
    folder = tmp_path_factory.mktemp("domains")
    for d, word in enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]):
        (folder / f"{word}.txt").write_text(" ".join(f"{word}{i * (d + 1) % 97}" for i in range(200)), encoding="utf-8")
    return str(folder)
