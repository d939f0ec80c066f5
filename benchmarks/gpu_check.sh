#!/usr/bin/env bash
# The prepared GPU check, for the lent GPU machine (see ../shared/TOOLCHAIN.md: Python 3.12, torch 2.11,
# triton 3.6, nvcc 13, pytest, pytest-xdist and pytest-benchmark preinstalled, no package registry, minutes
# of time).  Uses a metakernels/_C*.so built elsewhere for that Python and torch when one loads and its
# .sources stamp matches the sources here (see benchmarks/build_for_gpu_machine.sh), else builds the
# extension for sm_90 there; then runs the phases
# named (default: all, in this order):
#   lopt    the learned-optimizer step table (hidden=32 with torch.compile, then hidden=4 without)
#   profile the same step's time kernel by kernel (benchmarks/lopt_profile.py), at 1x1e7 and 16x1e6
#   tests   the CUDA and Triton tests (the same grid as on CPU), each failure logged as it happens
#           (on an H200 they needed more than 160 s with 16 workers)
#   update  the update-op table;   maml  the second-order MAML table
#   layers  the fused layers' table (not in the default list: it did not fit the first H200 calls)
# and prints a short summary last.  Every phase has its own timeout; the full logs go to $OUT.
#
#   bash benchmarks/gpu_check.sh              # as the device tool's command, timeout ~600 s
#   bash benchmarks/gpu_check.sh lopt tests   # what fits in less; add layers where time is left
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/metakernels_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export METAKERNELS_FAILURE_LOG=$OUT/failures.txt
PHASES=${*:-lopt profile tests update maml}
rm -f "$OUT/failed" "$METAKERNELS_FAILURE_LOG"
fail() { echo "$1" >> "$OUT/failed"; }
source benchmarks/source_stamp.sh
prebuilt_is_current() {
  local so
  so=$(python3 -c "import sysconfig; print('metakernels/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
  [ -f "$so" ] || return 1
  if [ "$(cat "$so.sources" 2>/dev/null)" != "$(source_stamp)" ]; then
    echo "$so was not built from these sources (its .sources stamp differs or is missing)"
    return 1
  fi
  python3 -c "import metakernels as mk, sys; e = mk._backend.extension(); sys.exit(e is None or not e.has_cuda())"
}
phase() {
  case $1 in
    tests)  # the learned optimizer's first: the rest did not all fit in 160 s on an H200
      timeout 60 python3 -m pytest -q -p no:cacheprovider -n 16 tests/test_learned_update.py \
        tests/test_learned_optimizer.py -k "cuda or triton" --junitxml="$OUT/tests_lopt.xml" || fail tests_lopt
      timeout 160 python3 -m pytest -q -p no:cacheprovider -n 16 tests -k "(cuda or triton) and not compiles_alone" \
        --deselect tests/test_learned_update.py --deselect tests/test_learned_optimizer.py \
        --junitxml="$OUT/tests.xml" || fail tests ;;
    lopt)
      LOPT_SIZES="1x100000 16x100000 1x1000000 16x1000000 1x10000000 16x10000000"
      timeout 100 python3 benchmarks/lopt_table.py --device cuda --hidden 32 --sizes $LOPT_SIZES --markdown \
        | tee "$OUT/lopt_table.md" || fail lopt32
      timeout 40 python3 benchmarks/lopt_table.py --device cuda --hidden 4 --no-compile --sizes $LOPT_SIZES --markdown \
        | tee -a "$OUT/lopt_table.md" || fail lopt4 ;;
    profile)
      timeout 90 python3 benchmarks/lopt_profile.py --device cuda --hidden 32 4 --sizes 1x10000000 16x1000000 \
        | tee "$OUT/lopt_profile.txt" || fail profile ;;
    update)
      timeout 60 python3 benchmarks/update_table.py --device cuda --sizes 16x1000000 16x16000000 --markdown \
        | tee "$OUT/update_table.md" || fail update ;;
    layers)
      timeout 90 python3 benchmarks/layers_table.py --device cuda --no-compile --markdown \
        | tee "$OUT/layers_table.md" || fail layers ;;
    maml)
      timeout 50 python3 benchmarks/maml_table.py --device cuda --variants metakernels metakernels-fused \
        metakernels-low stacked-recipe --markdown | tee "$OUT/maml_table.md" || fail maml ;;
    *) echo "unknown phase $1"; fail "phase:$1" ;;
  esac
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  if ! prebuilt_is_current; then
    echo "no current prebuilt extension: building here"
    time python3 setup.py build_ext --inplace -q || fail build
  fi
  python3 -c "import metakernels; print(metakernels.backend_info()['backends'])"
  for p in $PHASES; do echo "== $p"; phase "$p"; done
} 2>&1 | tee "$OUT/gpu_check.log"
# The block above runs in a pipeline (a subshell), so failures are recorded in a file.
status=0
[ -f "$OUT/failed" ] && status=1
echo "== summary: ${status/0/ok} $(cat "$OUT/failed" 2>/dev/null | tr "\n" " ")"
grep -E "^FAILED" "$METAKERNELS_FAILURE_LOG" 2>/dev/null | cut -c1-160 | head -20
grep -E "[0-9]+ (passed|failed)" "$OUT/gpu_check.log" | tail -1
grep -E "^\| (32|4) \| (1x1000000|16x1000000|1x10000000) \| " "$OUT/lopt_table.md" 2>/dev/null | cut -d'|' -f2-9
grep -E "^hidden=32 1x10000000 (cuda|triton)" "$OUT/lopt_profile.txt" 2>/dev/null
grep -E "^\| (sgd|adam) \| 16x16000000" "$OUT/update_table.md" 2>/dev/null
grep -E "^\| (metakernels|stacked)" "$OUT/maml_table.md" 2>/dev/null
exit $status
