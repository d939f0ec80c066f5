#!/usr/bin/env bash
# Builds metakernels/_C.cpython-312-x86_64-linux-gnu.so for the lent GPU machine (Python 3.12, torch
# 2.11.0+cu130, sm_90) on this GPU-less machine, so that the scarce device time is not spent compiling:
# a Python 3.12 venv with that torch (no dependencies: the nvidia-* libraries of .venv stand in for
# importing it), the working tree's sources built with .venv's CUDA headers, debug sections stripped.
# benchmarks/gpu_check.sh uses the result when it loads there and was built from the same sources (the
# stamp written next to it, see benchmarks/source_stamp.sh), and builds there otherwise.
#
#   bash benchmarks/build_for_gpu_machine.sh     # after .ci/setup; ~15 min on 2 cores
#   then carry metakernels/_C.cpython-312-x86_64-linux-gnu.so and its .sources with the device tool's run
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
source benchmarks/source_stamp.sh
stamp=$(source_stamp)  # of the sources as they are now, before the minutes of building
PY312=${PY312:-$(command -v python3.12)}
VENV=${VENV:-/tmp/metakernels-gpu-venv}
BUILD=${BUILD:-/tmp/metakernels-gpu-build}
NVIDIA=$(.venv/bin/python -c "import nvidia, os; print(list(nvidia.__path__)[0])")

[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --no-deps "torch==2.11.0"
"$VENV/bin/python" -m pip install -q "setuptools<82" pybind11 ninja numpy typing_extensions sympy filelock jinja2 networkx fsspec

mkdir -p "$BUILD"  # kept between runs: ninja rebuilds only what changed
git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | tar -x -C "$BUILD"
cd "$BUILD"
LD_LIBRARY_PATH=$(ls -d "$NVIDIA"/*/lib | tr '\n' ':') PATH="$VENV/bin:$PATH" CUDA_HOME=/usr/local/cuda \
  CPATH="$NVIDIA/cu13/include" TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" setup.py build_ext --inplace -q
so=metakernels/_C.cpython-312-x86_64-linux-gnu.so
strip --strip-debug "$so"
cp "$so" "$REPO/$so"
echo "$stamp" > "$REPO/$so.sources"
ls -l "$REPO/$so" "$REPO/$so.sources"
