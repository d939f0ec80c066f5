"""Builds the CUDA sources of csrc/cuda for the CPU with the stand-in runtime of this folder
(cuda_runtime.h), so that tests can run their kernels' indexing and synchronisation without a GPU.

Each source is compiled as it is, after two rewrites that C++ cannot express otherwise:
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``mk_emu::launch(kernel, grid, block, smem,
stream)(args)``, and ``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared memory.
``__CUDACC__`` is defined in the kernels' files, so the shared headers compile their CUDA branches."""
from __future__ import annotations

import inspect
import os
import re

import pytest
import torch.utils.cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(REPO, "csrc")

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?)\s*<<<(.+?)>>>\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ ([\w ]+?) (\w+)\[\];")


def host_source(cuda_source: str) -> str:
    """The CUDA source text rewritten for the host compiler (see the module docstring)."""
    text = _LAUNCH.sub(lambda m: f"mk_emu::launch({m.group(1)}, {m.group(2)})(", cuda_source)
    return _DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(mk_emu::dynamic_shared);", text)


# The op families with CUDA kernels: csrc/cuda/<family>.cu and python/<family>_binding.cpp each.
FAMILIES = ("update", "lopt", "norm", "gelu", "softmax", "xent")


def build():
    """Compiles every csrc/cuda/<family>.cu (rewritten) with the real bindings of python/ (MK_CUDA_EMULATION)
    and module.cpp into a torch extension module and returns it (rebuilt by ninja where a source changed): the
    functions of metakernels._C for those families, which on CPU tensors run the CUDA kernels.  With
    METAKERNELS_SANITIZE=1 (.ci/sanitize) it is built with AddressSanitizer and UndefinedBehaviorSanitizer, whose
    runtimes the process must have preloaded: an out-of-bounds index in a kernel then fails the run."""
    sanitize = os.environ.get("METAKERNELS_SANITIZE") == "1"
    name = "mk_cuda_emulated" + ("_sanitized" if sanitize else "")
    build_dir = os.path.join(REPO, "build", "cuda_emulation", name)
    os.makedirs(build_dir, exist_ok=True)
    sources = [_host_file(family, build_dir) for family in FAMILIES]
    sources += [os.path.join(REPO, "python", f"{family}_binding.cpp") for family in FAMILIES]
    sources += [os.path.join(REPO, "python", "common.cpp"), os.path.join(HERE, "module.cpp")]
    # HERE first, so that its cuda_runtime.h and cuda_fp16.h stand in for the toolkit's.
    flags = ["-O1", "-std=c++20", "-DMK_CUDA_EMULATION", f"-I{HERE}", f"-I{CSRC}", f"-I{os.path.join(CSRC, 'cuda')}",
             f"-I{os.path.join(REPO, 'python')}", "-Wno-unknown-pragmas"]
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if sanitize else []
    module = torch.utils.cpp_extension.load(name, sources, extra_cflags=flags + sanitizers, extra_ldflags=sanitizers,
                                            build_directory=build_dir, verbose=False)
    module.set_poison_outputs(True)
    return module


def _host_file(family: str, build_dir: str) -> str:
    """csrc/cuda/<family>.cu rewritten for the host compiler into build_dir, with __CUDACC__ defined (there only:
    the bindings' torch headers would then want the CUDA toolkit)."""
    cuda_file = os.path.join(CSRC, "cuda", f"{family}.cu")
    with open(cuda_file, encoding="utf-8") as f:
        text = f"#define __CUDACC__\n#line 1 \"{cuda_file}\"\n" + host_source(f.read())
    path = os.path.join(build_dir, f"{family}_host.cpp")
    if _read(path) != text:  # rewritten only when changed, so that ninja's timestamps stay meaningful
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


class WithEmulatedCuda:
    """metakernels._C with the emulated module's functions in place of its own (the rest, e.g. attention's,
    stay the real module's): what metakernels._backend.extension() returns while the tests run the CUDA
    kernels on the CPU."""

    def __init__(self, emulated, real):
        self._emulated, self._real = emulated, real

    def __getattr__(self, name):
        return getattr(self._emulated if hasattr(self._emulated, name) else self._real, name)


def on_emulated_cuda(test, params: dict | None = None):
    """`test`, a test of another module that takes the `backend` fixture, as a test of the emulated CUDA kernels:
    the same test and marks, with the conftest fixture `emulated_cuda_kernels` as its backend.  `params` replaces
    some of its parametrizations ({"T,P": [...]}: argument names as the mark names them, and values), for runs
    that would take too long under the emulation."""
    params = params or {}
    signature = inspect.signature(test)

    def run(emulated_cuda_kernels, **kwargs):
        test(emulated_cuda_kernels, **kwargs)

    fixture = inspect.Parameter("emulated_cuda_kernels", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    run.__signature__ = signature.replace(
        parameters=[fixture, *(p for name, p in signature.parameters.items() if name != "backend")])
    marks = [m for m in getattr(test, "pytestmark", []) if not (m.name == "parametrize" and m.args[0] in params)]
    run.pytestmark = marks + [pytest.mark.parametrize(names, values) for names, values in params.items()]
    run.__name__, run.__qualname__, run.__doc__ = test.__name__, test.__name__, test.__doc__
    return run


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()
