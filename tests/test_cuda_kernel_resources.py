"""Static properties of the CUDA learned-optimizer kernels, read off their sm_90 machine code without a GPU
(benchmarks/sass_counts.py): the fixed-shape step kernels keep the MLP in registers (no stack) and load
the weights 16 bytes at a time (the hidden = 32 MLP: 1,458 four-byte loads for 1,399 FMAs before), and the
fixed-shape fp32 backward does not spill its weights (a 5.5 KB stack before; see the kernels' comments in
csrc/cuda/lopt.cu)."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import sass_counts  # noqa: E402

NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
TOOLS = os.pathsep.join(sass_counts.tool_dirs() + [os.environ.get("PATH", "")])


@pytest.mark.skipif(not os.path.exists(NVCC), reason=f"no CUDA toolkit ({NVCC})")
@pytest.mark.skipif(shutil.which("nvdisasm", path=TOOLS) is None,
                    reason="nvdisasm not installed (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
def test_fixed_shape_step_kernels_use_registers_and_wide_weight_loads():
    report, sass = sass_counts.compile_and_disassemble(os.path.join(ROOT, "csrc", "cuda", "lopt.cu"), "sm_90")
    resources = sass_counts.ptxas_resources(report)
    counts = {sass_counts.readable(name): (resources[name], c) for name, c in sass_counts.instruction_counts(sass).items()}
    for dtype in ("float", "double", "__nv_bfloat16", "__half"):
        for hidden in (4, 32):
            resource, c = counts[f"step_kernel<{dtype}, {hidden}, {hidden}, 2>"]
            assert resource.endswith(" 0 B stack") and c["LDL"] == c["STL"] == 0, (dtype, hidden, resource)
    _, c = counts["step_kernel<float, 32, 32, 2>"]
    assert c["FFMA"] >= 1376 and c["FFMA"] >= 3 * c["LDG"], c  # 1,376 multiply-adds per element
    for dtype in ("float", "__nv_bfloat16"):
        resource, c = counts[f"backward_kernel<{dtype}, 32, 2>"]
        stack = int(resource.split(", ")[1].split(" ")[0])
        assert stack <= 256 and c["FFMA"] >= 2 * 1376 and c["FFMA"] >= 2 * c["LDG"], (dtype, resource, c)
