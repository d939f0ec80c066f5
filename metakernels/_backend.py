"""Which implementation of an op runs: the single dispatch point of every op family.

Every op has four implementations: ``reference`` (plain PyTorch: the oracle and the fallback), ``cpu``
(the C++ kernels of the compiled extension ``metakernels._C``), ``cuda`` (its CUDA kernels) and
``triton``.  The choice, per call, by the device of the inputs:

* a forced backend, if any: ``with metakernels.use_backend(name):`` or else the environment variable
  ``METAKERNELS_BACKEND``; a forced backend that cannot run on these inputs raises
  :class:`BackendUnavailableError` instead of falling back;
* otherwise CPU tensors run on ``cpu`` (``reference`` without the extension) and CUDA tensors on
  ``cuda``, else ``triton``, else ``reference``; other devices run on ``reference``.

A missing compiled extension is reported once, with a warning, when metakernels is imported.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "METAKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given inputs."""


def _load_extension():
    try:
        return importlib.import_module("metakernels._C"), None
    except ImportError as exc:  # the extension was not built, or was built against another torch
        return None, f"{type(exc).__name__}: {exc}"


_EXT, _EXT_ERROR = _load_extension()
if _EXT is None:
    warnings.warn(
        "metakernels: the compiled extension metakernels._C could not be loaded "
        f"({_EXT_ERROR}); the cpu and cuda backends are off and the pure-PyTorch reference backend "
        "serves instead (correct, slower). Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

_forced = threading.local()


def extension():
    """The compiled module ``metakernels._C``, or None when it could not be loaded."""
    return _EXT


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_unavailable(name: str, device: torch.device | None) -> str | None:
    """None when backend ``name`` can run on ``device`` (any device when None), else the reason."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda") and _EXT is None:
        return f"the compiled extension metakernels._C is not loaded ({_EXT_ERROR})"
    if name == "cpu":
        if device is not None and device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, the inputs are on {device}"
        return None
    if name == "cuda":
        if not _EXT.has_cuda():
            return "metakernels._C was built without CUDA kernels (CPU-only torch or no CUDA toolkit)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if device is not None and device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, the inputs are on {device}"
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        on_cpu_ok = _triton_interpreted()
        if device is None:
            if torch.cuda.is_available() or on_cpu_ok:
                return None
            return "no CUDA device, and TRITON_INTERPRET=1 is not set for the CPU interpreter"
        if device.type == "cuda" or (device.type == "cpu" and on_cpu_ok):
            return None
        if device.type == "cpu":
            return "triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before import)"
        return f"triton cannot run on {device}"
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``METAKERNELS_BACKEND``, or None."""
    name = getattr(_forced, "name", None) or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force backend ``name`` for the ops called inside the ``with`` block (this thread only)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def select(device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on tensors on ``device``."""
    forced = forced_backend()
    if forced is not None:
        reason = _why_unavailable(forced, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} was forced but is unavailable: {reason}")
        return forced
    if device.type == "cpu":
        candidates = ("cpu",)
    elif device.type == "cuda":
        candidates = ("cuda", "triton")
    else:
        candidates = ()
    for name in candidates:
        if _why_unavailable(name, device) is None:
            return name
    return "reference"


def backend_info() -> dict:
    """What is available, what runs by default on each device type, and why a backend is off."""
    backends = {}
    for name in BACKENDS:
        reason = _why_unavailable(name, None)
        backends[name] = {"available": reason is None, "reason": reason or "available"}
    device_types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    defaults = {}
    for device_type in device_types:
        try:
            defaults[device_type] = select(torch.device(device_type), "backend_info")
        except BackendUnavailableError as exc:
            defaults[device_type] = f"none: {exc}"
    return {
        "forced": forced_backend(),
        "default": defaults,
        "backends": backends,
        "extension": "loaded" if _EXT is not None else f"not loaded: {_EXT_ERROR}",
        "torch": torch.__version__,
        "triton_interpreter": _triton_interpreted(),
    }


def set_poison_outputs(on: bool) -> None:
    """Fill every kernel output with NaN before the kernel writes it (a test aid; all backends)."""
    global POISON_OUTPUTS
    POISON_OUTPUTS = bool(on)
    if _EXT is not None:
        _EXT.set_poison_outputs(bool(on))


POISON_OUTPUTS = False
