#!/usr/bin/env bash
# The prepared GPU check, for the lent GPU machine (see ../shared/TOOLCHAIN.md: torch 2.11, triton 3.6,
# nvcc 13, pytest and pytest-benchmark preinstalled, no package registry, minutes of time).
# Builds the extension for sm_90, runs the CUDA and Triton tests (the same grid as on CPU), the
# update-op, learned-optimizer, MAML and fused-layer benchmarks at GPU sizes, and prints a short table last.  The full log goes to $OUT.
#
#   bash benchmarks/gpu_check.sh        # typically as the device tool's command, timeout ~480 s
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/metakernels_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
rm -f "$OUT/failed"
fail() { echo "$1" >> "$OUT/failed"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== build"
  time python3 -m pip install -q --no-build-isolation --no-deps -e . || fail build
  python3 -c "import json, metakernels; print(json.dumps(metakernels.backend_info(), indent=1))"
  echo "== CUDA and Triton tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests -k "cuda or triton" --junitxml="$OUT/tests.xml" || fail tests
  echo "== update-op benchmark"
  timeout 150 python3 benchmarks/update_table.py --device cuda --sizes 16x1000000 16x16000000 --markdown \
    | tee "$OUT/update_table.md" || fail benchmark
  echo "== learned-optimizer step benchmark"
  timeout 120 python3 benchmarks/lopt_table.py --device cuda --sizes 1x1000000 16x1000000 --no-compile --markdown \
    | tee "$OUT/lopt_table.md" || fail lopt_benchmark
  echo "== second-order MAML benchmark (the benchmark LM, T=16, K=5)"
  timeout 120 python3 benchmarks/maml_table.py --device cuda --variants metakernels metakernels-fused metakernels-low \
    stacked-recipe --markdown | tee "$OUT/maml_table.md" || fail maml_benchmark
  echo "== fused layers benchmark"
  timeout 90 python3 benchmarks/layers_table.py --device cuda --rows 2048 --width 1024 --no-compile --markdown \
    | tee "$OUT/layers_table.md" || fail layers_benchmark
} 2>&1 | tee "$OUT/gpu_check.log"
# The block above runs in a pipeline (a subshell), so failures are recorded in a file.
status=0
[ -f "$OUT/failed" ] && status=1
echo "== summary: ${status/0/ok} $(cat "$OUT/failed" 2>/dev/null | tr "\n" " ")"
grep -E "passed|failed|error" "$OUT/gpu_check.log" | tail -3
grep -E "^\| (sgd|adam) \| 16x16000000" "$OUT/update_table.md" 2>/dev/null
grep -E "^\| 32 \| 16x1000000 \| (cuda|eager) " "$OUT/lopt_table.md" 2>/dev/null
grep -E "double backward" "$OUT/layers_table.md" 2>/dev/null
grep -E "^\| (metakernels|stacked)" "$OUT/maml_table.md" 2>/dev/null
exit $status
