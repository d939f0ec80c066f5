"""Builds metakernels._C with torch's cpp_extension tooling (ninja).

The CPU kernels are always built.  The CUDA kernels are added when torch is a CUDA build and a CUDA
toolkit is found (torch.utils.cpp_extension.CUDA_HOME), so CI compiles and links them even on a machine
without a GPU.  METAKERNELS_NO_CUDA=1 skips them; TORCH_CUDA_ARCH_LIST picks the GPU architectures
(default: 9.0, the H100/H200).  METAKERNELS_SANITIZE=1 builds the CPU kernels with ASan and UBSan
(see .ci/sanitize).
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


SANITIZE = os.environ.get("METAKERNELS_SANITIZE", "0") == "1"


def _libmvec():
    """glibc's vector math library has expf/tanhf/erff variants from 2.35 on x86-64 (csrc/cpu/vector_math.h)."""
    import platform

    version = (os.confstr("CS_GNU_LIBC_VERSION") or "") if hasattr(os, "confstr") else ""
    if platform.machine() != "x86_64" or not version.startswith("glibc "):
        return False
    major, minor = (int(p) for p in version.split()[1].split(".")[:2])
    return (major, minor) >= (2, 35)


def _want_cuda():
    if os.environ.get("METAKERNELS_NO_CUDA", "0") == "1" or SANITIZE:
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    # NOTE: -fno-math-errno and -fno-trapping-math let GCC vectorise the sqrt, the division and the
    # v' > 0 select of the Adam loops (checked with -fopt-info-vec: without them 34 of the 72 inner
    # loops stayed scalar, and Adam's backward ran at 78 ms for 16M elements on 2 cores).
    # -fopenmp: at::parallel_for is an inline OpenMP region; without it the kernels run on one thread.
    # -fno-wrapv undoes the -fwrapv that Python's build flags add: with wrapping int arithmetic GCC cannot
    # prove that x[k * L + l] is contiguous in l and vectorised the learned optimizer's lane loops with
    # emulated gathers (perf annotate: vinsertps / vpextrd; 6 GFLOP/s at hidden=32).
    # The C++ standard is the one torch's tooling picks.
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-wrapv", "-fopenmp"]
    link = ["-fopenmp"]
    if SANITIZE:  # .ci/sanitize: AddressSanitizer + UndefinedBehaviorSanitizer over the CPU kernels
        cxx += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
        link += ["-fsanitize=address,undefined"]
    macros = []
    if _libmvec():
        macros.append(("MK_HAVE_LIBMVEC", None))
        link.append("-lmvec")
    sources = _sources("python/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "metakernels._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return cpp_extension.CUDAExtension(
        "metakernels._C",
        sources + _sources("csrc/cuda/*.cu"),
        define_macros=macros + [("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
