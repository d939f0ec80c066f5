"""Static counts of a CUDA source's kernels, without a GPU: compiles it for sm_90 with nvcc, then prints
for each kernel (optionally only those whose demangled name contains a --kernels word) ptxas's registers and
stack frame, and how many machine instructions of each class it has: FMAs, global / shared / local
loads and stores (local ones are spills or arrays the compiler could not keep in registers), double
precision and conversions.  Counts are per instruction in the code, not per execution: a loop body counts
once.  What they show is what a kernel asks of each unit per element where its code is straight-line (the
fixed-shape MLPs): e.g. one global load per FMA is a load-bound kernel.

Needs cuobjdump and nvdisasm, which the CUDA toolkit here lacks: ``pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm`` into .venv (they land in nvidia/cu13/bin, where this script looks).

    python benchmarks/sass_counts.py csrc/cuda/lopt.cu --kernels step_kernel backward_kernel
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

CLASSES = ["FFMA", "DFMA", "LDG", "LDS", "LDL", "STG", "STS", "STL", "F2F", "BAR"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_dirs() -> list[str]:
    """Where cuobjdump and nvdisasm may be: the nvidia-cuda-* wheels' bin folder, then PATH."""
    try:
        import nvidia.cu13

        return [os.path.join(p, "bin") for p in nvidia.cu13.__path__]
    except ImportError:
        return []


def cuda_include() -> list[str]:
    try:
        import nvidia.cu13

        return [f"-I{os.path.join(p, 'include')}" for p in nvidia.cu13.__path__]
    except ImportError:
        return []


def compile_and_disassemble(source: str, arch: str) -> tuple[str, str]:
    """(ptxas -v's report, cuobjdump -sass's listing) of source compiled for arch."""
    env = dict(os.environ, PATH=os.pathsep.join(tool_dirs() + [os.environ.get("PATH", "")]))
    if shutil.which("nvdisasm", path=env["PATH"]) is None:
        sys.exit("nvdisasm not found: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "kernels.o")
        built = subprocess.run([nvcc, f"-arch={arch}", "-O3", "-std=c++17", *cuda_include(), "-Xptxas", "-v", "-c",
                                source, "-o", obj], capture_output=True, text=True, env=env)
        if built.returncode != 0:
            sys.exit(built.stderr)
        sass = subprocess.run(["cuobjdump", "-sass", obj], capture_output=True, text=True, env=env, check=True)
    return built.stderr, sass.stdout


def ptxas_resources(report: str) -> dict[str, str]:
    """Mangled kernel name -> 'R registers, S B stack' from ptxas -v."""
    out, name = {}, None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif (m := re.search(r"(\d+) bytes stack frame", line)) and name:
            out[name] = f"{m.group(1)} B stack"
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            out[name] = f"{m.group(1)} registers, {out.get(name, '? B stack')}"
    return out


def instruction_counts(sass: str) -> dict[str, collections.Counter]:
    """Mangled kernel name -> Counter of instruction classes (the opcode before its first '.')."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", chunk)
        out[name] = collections.Counter(ops)
    return out


def readable(mangled: str) -> str:
    """step_kernel<float, 32, 32, 2>: the demangled name (c++filt) without its namespaces and parameters."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    return re.sub(r"^.*::", "", name.replace("(anonymous namespace)::", "").split("(")[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a .cu file that compiles alone (csrc/cuda/*.cu do)")
    ap.add_argument("--kernels", nargs="*", default=[],
                    help="only kernels whose name contains one of these (e.g. step_kernel, 'step_kernel<float')")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args(argv)
    report, sass = compile_and_disassemble(args.source, args.arch)
    resources = ptxas_resources(report)
    print("| kernel | ptxas | instructions | " + " | ".join(CLASSES) + " |")
    print("|---|---|---|" + "---|" * len(CLASSES))
    for name, counts in sorted(instruction_counts(sass).items(), key=lambda kv: readable(kv[0])):
        kernel = readable(name)
        if args.kernels and not any(k in kernel for k in args.kernels):
            continue
        cells = [str(counts[c]) for c in CLASSES]
        print(f"| {kernel} | {resources.get(name, '?')} | {sum(counts.values())} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
