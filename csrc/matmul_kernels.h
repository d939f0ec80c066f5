// The task-batched matrix product on the CPU in float32: for each of B batch items,
//
//     out[n] = start[n] + a[n] b[n]        (a: [M, K], b: [K, N], start: [M, N] or one row broadcast, or none)
//
// with any element strides for a and b (so transposed operands need no copy), out's rows contiguous.
// It exists for CPUs whose vendor BLAS leaves half their vector width unused: on a 2-core AMD EPYC of
// family 26 (Zen 5, 512-bit FMA units) MKL's sgemm runs 256-bit kernels at 210-235 GFLOP/s, this kernel
// at 400-530 on the inner loop's shapes (benchmarks/RESULTS.md).  metakernels/ops/matmul.py decides
// where it runs; the sums over k are in order, in float32.
#pragma once

#include <cstdint>

namespace mk {

struct TaskMatmulArgs {
  int64_t batch, M, K, N;
  const float* a;
  int64_t a_batch, a_row, a_col;  // element strides of a
  const float* b;
  int64_t b_batch, b_row, b_col;
  const float* start;                    // nullptr: no start term
  int64_t start_batch, start_row;        // start_row = 0: one row broadcast over the M rows; columns contiguous
  float* out;
  int64_t out_batch, out_row;            // columns contiguous
};

// Only where task_matmul_uses_avx512() (the binding checks): it computes nothing elsewhere.
void task_matmul_cpu(const TaskMatmulArgs& args);

// Whether task_matmul_cpu can run: AVX-512 present and allowed (metakernels._C.set_cpu_avx512).
bool task_matmul_uses_avx512();

}  // namespace mk
