// CPU kernel of the task-batched float32 product (csrc/matmul_kernels.h), AVX-512 only: elsewhere the
// vendor BLAS is at least as fast and metakernels/ops/matmul.py calls torch.bmm.
//
// Per batch item, the columns of b are taken kCols = 32 at a time and copied into a contiguous [K, 32]
// panel (zero-padded past N), which stays in L1/L2 while every block of kRows = 8 rows of a runs over
// it: 8 x 32 accumulators (16 registers of 16 floats), per k two panel loads, eight broadcasts of a's
// elements and sixteen multiply-adds.  a is read through its strides (row-major or transposed alike).
// The (batch item, column panel) pairs are split between threads.  The sums over k run in order, one
// accumulator per output, so K = 0 gives start (or zeros).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "../matmul_kernels.h"
#include "aligned_buffer.h"
#include "clones.h"

namespace mk {
namespace {

constexpr int kRows = 8;
constexpr int kCols = 32;

// 16 floats in GCC's vector extension: one 512-bit register.  Every function passing it is inlined into
// the AVX-512 instance, so GCC's note that its ABI would differ without AVX-512 (-Wpsabi) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x16 __attribute__((vector_size(64)));

MK_CPU_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

MK_CPU_INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// rows x cols (cols <= kCols) of out = start + a . panel, a's rows at stride a_row, its k at a_col.
template <int rows>
MK_CPU_INLINE void block(int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* panel, int cols,
                         const float* start, int64_t start_row, float* out, int64_t out_row) {
  f32x16 acc[rows][2];
  for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = f32x16{};
  for (int64_t k = 0; k < K; ++k) {
    const f32x16 b0 = load16(panel + k * kCols), b1 = load16(panel + k * kCols + 16);
    const float* ak = a + k * a_col;
#pragma GCC unroll 8
    for (int r = 0; r < rows; ++r) {
      const float s = ak[r * a_row];
      acc[r][0] += s * b0;
      acc[r][1] += s * b1;
    }
  }
  for (int r = 0; r < rows; ++r) {
    float* o = out + r * out_row;
    const float* st = start == nullptr ? nullptr : start + r * start_row;
    if (cols == kCols) {
      f32x16 lo = acc[r][0], hi = acc[r][1];
      if (st != nullptr) {
        lo += load16(st);
        hi += load16(st + 16);
      }
      store16(o, lo);
      store16(o + 16, hi);
    } else {
      float tmp[kCols];
      store16(tmp, acc[r][0]);
      store16(tmp + 16, acc[r][1]);
      for (int j = 0; j < cols; ++j) o[j] = st == nullptr ? tmp[j] : st[j] + tmp[j];
    }
  }
}

// Columns j0 .. j0 + kCols of batch item n.
MK_CPU_INLINE void matmul_panel(const TaskMatmulArgs& g, int64_t n, int64_t j0, float* panel) {
  const float* a = g.a + n * g.a_batch;
  const float* b = g.b + n * g.b_batch + j0 * g.b_col;
  const float* start = g.start == nullptr ? nullptr : g.start + n * g.start_batch + j0;
  float* out = g.out + n * g.out_batch + j0;
  const int cols = static_cast<int>(std::min<int64_t>(kCols, g.N - j0));
  for (int64_t k = 0; k < g.K; ++k) {
    const float* bk = b + k * g.b_row;
    float* pk = panel + k * kCols;
    for (int j = 0; j < cols; ++j) pk[j] = bk[j * g.b_col];
    for (int j = cols; j < kCols; ++j) pk[j] = 0.0f;
  }
  int64_t i = 0;
  for (; i + kRows <= g.M; i += kRows)
    block<kRows>(g.K, a + i * g.a_row, g.a_row, g.a_col, panel, cols, start == nullptr ? nullptr : start + i * g.start_row,
                 g.start_row, out + i * g.out_row, g.out_row);
  const float* a_rest = a + i * g.a_row;
  const float* start_rest = start == nullptr ? nullptr : start + i * g.start_row;
  float* out_rest = out + i * g.out_row;
  switch (g.M - i) {
#define MK_REST_ROWS(R)                                                                                   \
  case R:                                                                                                 \
    block<R>(g.K, a_rest, g.a_row, g.a_col, panel, cols, start_rest, g.start_row, out_rest, g.out_row); \
    break;
    MK_REST_ROWS(1) MK_REST_ROWS(2) MK_REST_ROWS(3) MK_REST_ROWS(4) MK_REST_ROWS(5) MK_REST_ROWS(6) MK_REST_ROWS(7)
#undef MK_REST_ROWS
    default:
      break;
  }
}

#if MK_CPU_AVX512_PATH
// Work items lo .. hi, item = batch item * panels + column panel.
MK_CPU_AVX512 void matmul_items(const TaskMatmulArgs& g, int64_t panels, int64_t lo, int64_t hi, float* panel) {
  for (int64_t item = lo; item < hi; ++item) matmul_panel(g, item / panels, item % panels * kCols, panel);
}
#endif

}  // namespace

bool task_matmul_uses_avx512() { return cpu_uses_avx512(); }

void task_matmul_cpu(const TaskMatmulArgs& args) {
#if MK_CPU_AVX512_PATH
  if (args.batch == 0 || args.M == 0 || args.N == 0) return;
  const int64_t panels = (args.N + kCols - 1) / kCols;
  at::parallel_for(0, args.batch * panels, 1, [&](int64_t lo, int64_t hi) {
    AlignedVector<float> panel(static_cast<size_t>(std::max<int64_t>(args.K, 1)) * kCols);
    matmul_items(args, panels, lo, hi, panel.data());
  });
#endif
}

}  // namespace mk
