"""Every csrc/cuda/*.cu compiles alone with nvcc (no torch headers), wherever nvcc exists; and the
CUDA kernels run against the reference when a GPU is present (test_update_values covers that)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_there_are_cuda_sources():
    assert CUDA_SOURCES


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_alone_with_nvcc(source, tmp_path):
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", "-std=c++17", "-O3", "-c", str(source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, cwd=source.parent,
    )
    assert result.returncode == 0, result.stderr
