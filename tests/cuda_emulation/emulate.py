"""Builds a CUDA source of csrc/cuda for the CPU with the stand-in runtime of this folder
(cuda_runtime.h), so that tests can run its kernels' indexing and synchronisation without a GPU.

The source is compiled as it is, after two rewrites that C++ cannot express otherwise:
``kernel<<<grid, block, smem, stream>>>(args)`` becomes ``mk_emu::launch(kernel, grid, block, smem,
stream)(args)``, and ``extern __shared__ T name[];`` becomes a pointer to the block's dynamic shared memory.
``__CUDACC__`` is defined in the kernels' file (not in the binding's, whose torch headers would then
want the CUDA toolkit), so the shared headers compile their CUDA branches."""
from __future__ import annotations

import os
import re

import torch.utils.cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(REPO, "csrc")

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?)<<<(.+?)>>>\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ ([\w ]+?) (\w+)\[\];")


def host_source(cuda_source: str) -> str:
    """The CUDA source text rewritten for the host compiler (see the module docstring)."""
    text = _LAUNCH.sub(lambda m: f"mk_emu::launch({m.group(1)}, {m.group(2)})(", cuda_source)
    return _DYNAMIC_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(mk_emu::dynamic_shared);", text)


def build(name: str, cuda_file: str, binding: str):
    """Compiles csrc/cuda/<cuda_file> (rewritten) with tests/cuda_emulation/<binding> into a torch
    extension module `name` and returns it (rebuilt by ninja where a source changed).  With
    METAKERNELS_SANITIZE=1 (.ci/sanitize) it is built with AddressSanitizer and UndefinedBehaviorSanitizer,
    whose runtimes the process must have preloaded: an out-of-bounds index in a kernel then fails the run."""
    sanitize = os.environ.get("METAKERNELS_SANITIZE") == "1"
    name += "_sanitized" if sanitize else ""
    build_dir = os.path.join(REPO, "build", "cuda_emulation", name)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(CSRC, "cuda", cuda_file), encoding="utf-8") as f:
        text = f"#define __CUDACC__\n#line 1 \"{os.path.join(CSRC, 'cuda', cuda_file)}\"\n" + host_source(f.read())
    kernels = os.path.join(build_dir, cuda_file.replace(".cu", "_host.cpp"))
    if _read(kernels) != text:  # rewritten only when changed, so that ninja's timestamps stay meaningful
        with open(kernels, "w", encoding="utf-8") as f:
            f.write(text)
    # HERE first, so that its cuda_runtime.h and cuda_fp16.h stand in for the toolkit's.
    flags = ["-O1", "-std=c++20", f"-I{HERE}", f"-I{CSRC}", f"-I{os.path.join(CSRC, 'cuda')}", "-Wno-unknown-pragmas"]
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if sanitize else []
    return torch.utils.cpp_extension.load(name, [kernels, os.path.join(HERE, binding)], extra_cflags=flags + sanitizers,
                                          extra_ldflags=sanitizers, build_directory=build_dir, verbose=False)


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()
