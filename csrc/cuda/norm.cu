// CUDA kernels of the fused LayerNorm / RMSNorm: the per-element math of csrc/norm_math.h over raw
// pointers.  No torch headers: `nvcc -arch=sm_90 -c csrc/cuda/norm.cu` compiles this file alone.
//
// Row kernels: one block of kThreads threads per row; each thread sums its strided elements in order and
// the block combines the threads' sums with a fixed shared-memory tree, so results do not depend on
// scheduling.  Weight cotangents: a column kernel (one thread per (column, chunk of kNormRowsPerChunk
// rows, task)) writes per-chunk partial sums, and a second kernel adds the chunks in order, as the CPU
// backend does.  The double backward's row kernel leaves each row's A1, A2 in the scratch buffer for
// the column kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../norm_kernels.h"
#include "convert.cuh"

namespace mk {
namespace {

constexpr int kThreads = 128;
constexpr int kColThreads = 128;

// Sums kSums values over the block; every thread gets the totals.  Deterministic: a fixed tree.
template <int kSums, typename acc_t>
__device__ void block_sums(acc_t (&v)[kSums]) {
  __shared__ acc_t shared[kSums][kThreads];
  for (int s = 0; s < kSums; ++s) shared[s][threadIdx.x] = v[s];
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width)
      for (int s = 0; s < kSums; ++s) shared[s][threadIdx.x] += shared[s][threadIdx.x + width];
    __syncthreads();
  }
  for (int s = 0; s < kSums; ++s) v[s] = shared[s][0];
  __syncthreads();
}

template <typename scalar_t>
__global__ void forward_kernel(NormArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = blockIdx.x, n = row / a.R, base = row * a.D;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(a.D);
  acc_t m[1] = {0};
  if (a.centered) {
    for (int64_t i = threadIdx.x; i < a.D; i += kThreads) m[0] += load<acc_t, scalar_t>(a.x, base + i);
    block_sums<1>(m);
    m[0] *= inv_d;
  }
  const acc_t mean = m[0];
  acc_t v[1] = {0};
  for (int64_t i = threadIdx.x; i < a.D; i += kThreads) {
    const acc_t c = load<acc_t, scalar_t>(a.x, base + i) - mean;
    v[0] += c * c;
  }
  block_sums<1>(v);
  const acc_t r = acc_t(1) / sqrt(v[0] * inv_d + static_cast<acc_t>(a.eps));
  for (int64_t i = threadIdx.x; i < a.D; i += kThreads) {
    const acc_t b = a.b == nullptr ? acc_t(0) : load<acc_t, scalar_t>(a.b, n * a.D + i);
    const acc_t xh = (load<acc_t, scalar_t>(a.x, base + i) - mean) * r;
    store<scalar_t>(a.out, base + i, norm_y(xh, load<acc_t, scalar_t>(a.w, n * a.D + i), b));
  }
  if (threadIdx.x == 0) {
    static_cast<acc_t*>(a.mean)[row] = mean;
    static_cast<acc_t*>(a.rstd)[row] = r;
  }
}

template <typename scalar_t>
__global__ void backward_row_kernel(NormArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = blockIdx.x, n = row / a.R, base = row * a.D;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(a.D);
  const acc_t mean = static_cast<const acc_t*>(a.mean)[row], r = static_cast<const acc_t*>(a.rstd)[row];
  acc_t s[2] = {0, 0};
  for (int64_t i = threadIdx.x; i < a.D; i += kThreads) {
    const acc_t gh = load<acc_t, scalar_t>(a.g, base + i) * load<acc_t, scalar_t>(a.w, n * a.D + i);
    s[0] += gh;
    s[1] += gh * (load<acc_t, scalar_t>(a.x, base + i) - mean) * r;
  }
  block_sums<2>(s);
  const acc_t m1 = a.centered ? s[0] * inv_d : acc_t(0), m2 = s[1] * inv_d;
  for (int64_t i = threadIdx.x; i < a.D; i += kThreads) {
    const acc_t gh = load<acc_t, scalar_t>(a.g, base + i) * load<acc_t, scalar_t>(a.w, n * a.D + i);
    const acc_t xh = (load<acc_t, scalar_t>(a.x, base + i) - mean) * r;
    store<scalar_t>(a.out, base + i, norm_dx(r, gh, m1, xh, m2));
  }
}

template <typename scalar_t>
__global__ void double_backward_row_kernel(NormArgs a, typename AccType<scalar_t>::type* row_stats) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = blockIdx.x, n = row / a.R, base = row * a.D;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(a.D);
  const acc_t mean = static_cast<const acc_t*>(a.mean)[row], r = static_cast<const acc_t*>(a.rstd)[row];
  acc_t s[5] = {0, 0, 0, 0, 0};
  for (int64_t i = threadIdx.x; i < a.D; i += kThreads) {
    const acc_t gh = load<acc_t, scalar_t>(a.g, base + i) * load<acc_t, scalar_t>(a.w, n * a.D + i);
    const acc_t xh = (load<acc_t, scalar_t>(a.x, base + i) - mean) * r;
    const acc_t ai = load<acc_t, scalar_t>(a.a, base + i);
    s[0] += gh;
    s[1] += gh * xh;
    s[2] += ai;
    s[3] += ai * xh;
    s[4] += ai * gh;
  }
  block_sums<5>(s);
  const acc_t m1 = a.centered ? s[0] * inv_d : acc_t(0), m2 = s[1] * inv_d;
  const acc_t A1 = a.centered ? s[2] * inv_d : acc_t(0), A2 = s[3] * inv_d;
  const acc_t slope = s[4] * inv_d - A1 * m1 - A2 * m2;
  acc_t gs[2] = {0, 0};
  for (int64_t i = threadIdx.x; i < a.D; i += kThreads) {
    const acc_t gi = load<acc_t, scalar_t>(a.g, base + i), wi = load<acc_t, scalar_t>(a.w, n * a.D + i);
    const acc_t xh = (load<acc_t, scalar_t>(a.x, base + i) - mean) * r;
    const acc_t G = norm_G(r, load<acc_t, scalar_t>(a.a, base + i), m2, A2, gi * wi,
                           load<acc_t, scalar_t>(a.aw, n * a.D + i), gi);
    gs[0] += G;
    gs[1] += G * xh;
  }
  block_sums<2>(gs);
  const acc_t mG = a.centered ? gs[0] * inv_d : acc_t(0), mGxh = gs[1] * inv_d;
  for (int64_t i = threadIdx.x; i < a.D; i += kThreads) {
    const acc_t gi = load<acc_t, scalar_t>(a.g, base + i), wi = load<acc_t, scalar_t>(a.w, n * a.D + i);
    const acc_t xh = (load<acc_t, scalar_t>(a.x, base + i) - mean) * r;
    const acc_t ai = load<acc_t, scalar_t>(a.a, base + i), awi = load<acc_t, scalar_t>(a.aw, n * a.D + i);
    const acc_t ab = load<acc_t, scalar_t>(a.ab, n * a.D + i);
    store<scalar_t>(a.out_g, base + i, wi * norm_dgh(r, ai, A1, xh, A2) + awi * xh + ab);
    store<scalar_t>(a.out, base + i, norm_ddx(r, norm_G(r, ai, m2, A2, gi * wi, awi, gi), mG, xh, mGxh, slope));
  }
  if (threadIdx.x == 0) {
    row_stats[2 * row] = A1;
    row_stats[2 * row + 1] = A2;
  }
}

// Per-chunk partial sums of the weight cotangents: backward (dw: g xh, db: g) or double backward
// (dw: g norm_dgh).  partial: [N, nchunks, 2, D].
template <typename scalar_t, bool kDouble>
__global__ void column_partials_kernel(NormArgs a, typename AccType<scalar_t>::type* partial,
                                       const typename AccType<scalar_t>::type* row_stats) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  const int64_t c = blockIdx.y, n = blockIdx.z, nchunks = gridDim.y;
  if (d >= a.D) return;
  const int64_t r0 = c * kNormRowsPerChunk, r1 = min(a.R, r0 + kNormRowsPerChunk);
  acc_t sw = 0, sb = 0;
  for (int64_t rr = r0; rr < r1; ++rr) {
    const int64_t row = n * a.R + rr, idx = row * a.D + d;
    const acc_t mean = static_cast<const acc_t*>(a.mean)[row], r = static_cast<const acc_t*>(a.rstd)[row];
    const acc_t gi = load<acc_t, scalar_t>(a.g, idx), xh = (load<acc_t, scalar_t>(a.x, idx) - mean) * r;
    if (kDouble) {
      sw += gi * norm_dgh(r, load<acc_t, scalar_t>(a.a, idx), row_stats[2 * row], xh, row_stats[2 * row + 1]);
    } else {
      sw += gi * xh;
      sb += gi;
    }
  }
  partial[((n * nchunks + c) * 2 + 0) * a.D + d] = sw;
  partial[((n * nchunks + c) * 2 + 1) * a.D + d] = sb;
}

template <typename scalar_t>
__global__ void column_sum_kernel(int64_t N, int64_t nchunks, int64_t D, const typename AccType<scalar_t>::type* partial,
                                  void* dw, void* db) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t nd = static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  if (nd >= N * D) return;
  const int64_t n = nd / D, d = nd % D;
  acc_t sw = 0, sb = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    sw += partial[((n * nchunks + c) * 2 + 0) * D + d];
    sb += partial[((n * nchunks + c) * 2 + 1) * D + d];
  }
  store<scalar_t>(dw, nd, sw);
  if (db != nullptr) store<scalar_t>(db, nd, sb);
}

template <typename scalar_t>
void launch_columns(const NormArgs& a, cudaStream_t s, bool is_double) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t nchunks = norm_chunks(a.R);
  acc_t* partial = static_cast<acc_t*>(a.scratch);
  acc_t* row_stats = partial + a.N * nchunks * 2 * a.D;
  const dim3 grid((a.D + kColThreads - 1) / kColThreads, nchunks, a.N);
  if (is_double) column_partials_kernel<scalar_t, true><<<grid, kColThreads, 0, s>>>(a, partial, row_stats);
  else column_partials_kernel<scalar_t, false><<<grid, kColThreads, 0, s>>>(a, partial, row_stats);
  column_sum_kernel<scalar_t><<<(a.N * a.D + kColThreads - 1) / kColThreads, kColThreads, 0, s>>>(
      a.N, nchunks, a.D, partial, a.dw, is_double ? nullptr : a.db);
}

// The column kernels' grid is (D blocks, chunks, N): CUDA caps its y and z sizes at 65535.
const char* check_grid(const NormArgs& a) {
  return norm_chunks(a.R) > 65535 || a.N > 65535 ? "more than 65535 row chunks or tasks for the column kernels" : nullptr;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* norm_forward_cuda(DType dtype, const NormArgs& a, void* stream) {
  if (a.N * a.R == 0) return nullptr;
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto s) {
    forward_kernel<decltype(s)><<<a.N * a.R, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  });
  return last_error();
}

const char* norm_backward_cuda(DType dtype, const NormArgs& a, void* stream) {
  if (a.N * a.R == 0) return nullptr;
  if (const char* err = check_grid(a)) return err;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto v) {
    backward_row_kernel<decltype(v)><<<a.N * a.R, kThreads, 0, s>>>(a);
    launch_columns<decltype(v)>(a, s, false);
  });
  return last_error();
}

const char* norm_double_backward_cuda(DType dtype, const NormArgs& a, void* stream) {
  if (a.N * a.R == 0) return nullptr;
  if (const char* err = check_grid(a)) return err;
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto v) {
    using acc_t = typename AccType<decltype(v)>::type;
    acc_t* row_stats = static_cast<acc_t*>(a.scratch) + a.N * norm_chunks(a.R) * 2 * a.D;
    double_backward_row_kernel<decltype(v)><<<a.N * a.R, kThreads, 0, s>>>(a, row_stats);
    launch_columns<decltype(v)>(a, s, true);
  });
  return last_error();
}

}  // namespace mk
