// CPU kernels of the fused LayerNorm / RMSNorm: the per-element math of csrc/norm_math.h in row loops
// threaded with at::parallel_for.
//
// Forward: one job per row (mean, variance, then y: three passes over the row, which stays in L1).
// Backward and double backward: one job per (task, chunk of kNormRowsPerChunk rows); each row is
// reduced and written, and its weight-cotangent terms are added to the chunk's partial sums; the partials
// are then summed over chunks in order, per (task, column): deterministic for any thread count.
// Row sums are `omp simd` reductions (GCC keeps a float sum scalar without them): vector partial sums
// combined in an order fixed by the build, so results repeat run to run on one machine.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../dispatch.h"
#include "../norm_kernels.h"
#include "clones.h"
#include "parallel.h"

namespace mk {
namespace {

template <typename scalar_t>
MK_CPU_CLONES void forward_row(int64_t D, bool centered, acc_of<scalar_t> eps, const scalar_t* __restrict__ x,
                               const scalar_t* __restrict__ w, const scalar_t* __restrict__ b,
                               scalar_t* __restrict__ y, acc_of<scalar_t>* mean_out, acc_of<scalar_t>* rstd_out) {
  using acc_t = acc_of<scalar_t>;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  acc_t mean = 0, var = 0;
  if (centered) {
#pragma omp simd reduction(+ : mean)
    for (int64_t i = 0; i < D; ++i) mean += static_cast<acc_t>(x[i]);
    mean *= inv_d;
  }
#pragma omp simd reduction(+ : var)
  for (int64_t i = 0; i < D; ++i) {
    const acc_t c = static_cast<acc_t>(x[i]) - mean;
    var += c * c;
  }
  const acc_t r = acc_t(1) / std::sqrt(var * inv_d + eps);
  if (b == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i)
      y[i] = static_cast<scalar_t>(norm_y((static_cast<acc_t>(x[i]) - mean) * r, static_cast<acc_t>(w[i]), acc_t(0)));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i)
      y[i] = static_cast<scalar_t>(
          norm_y((static_cast<acc_t>(x[i]) - mean) * r, static_cast<acc_t>(w[i]), static_cast<acc_t>(b[i])));
  }
  *mean_out = mean;
  *rstd_out = r;
}

// One row of the backward; adds g xh and g to the chunk partials pw, pb.
template <typename scalar_t>
MK_CPU_CLONES void backward_row(int64_t D, bool centered, acc_of<scalar_t> mean, acc_of<scalar_t> r,
                                const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ w, scalar_t* __restrict__ dx,
                                acc_of<scalar_t>* __restrict__ pw, acc_of<scalar_t>* __restrict__ pb) {
  using acc_t = acc_of<scalar_t>;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  acc_t s_gh = 0, s_ghxh = 0;
#pragma omp simd reduction(+ : s_gh, s_ghxh)
  for (int64_t i = 0; i < D; ++i) {
    const acc_t gh = static_cast<acc_t>(g[i]) * static_cast<acc_t>(w[i]);
    s_gh += gh;
    s_ghxh += gh * (static_cast<acc_t>(x[i]) - mean) * r;
  }
  const acc_t m1 = centered ? s_gh * inv_d : acc_t(0), m2 = s_ghxh * inv_d;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]), xh = (static_cast<acc_t>(x[i]) - mean) * r;
    dx[i] = static_cast<scalar_t>(norm_dx(r, gi * static_cast<acc_t>(w[i]), m1, xh, m2));
    pw[i] += gi * xh;
    pb[i] += gi;
  }
}

template <typename scalar_t>
MK_CPU_CLONES void double_backward_row(int64_t D, bool centered, acc_of<scalar_t> mean, acc_of<scalar_t> r,
                                       const scalar_t* __restrict__ a, const scalar_t* __restrict__ aw,
                                       const scalar_t* __restrict__ ab, const scalar_t* __restrict__ g,
                                       const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                       scalar_t* __restrict__ dg, scalar_t* __restrict__ dx,
                                       acc_of<scalar_t>* __restrict__ pw) {
  using acc_t = acc_of<scalar_t>;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  acc_t s_gh = 0, s_ghxh = 0, s_a = 0, s_axh = 0, s_agh = 0;
#pragma omp simd reduction(+ : s_gh, s_ghxh, s_a, s_axh, s_agh)
  for (int64_t i = 0; i < D; ++i) {
    const acc_t gh = static_cast<acc_t>(g[i]) * static_cast<acc_t>(w[i]);
    const acc_t xh = (static_cast<acc_t>(x[i]) - mean) * r, ai = static_cast<acc_t>(a[i]);
    s_gh += gh;
    s_ghxh += gh * xh;
    s_a += ai;
    s_axh += ai * xh;
    s_agh += ai * gh;
  }
  const acc_t m1 = centered ? s_gh * inv_d : acc_t(0), m2 = s_ghxh * inv_d;
  const acc_t A1 = centered ? s_a * inv_d : acc_t(0), A2 = s_axh * inv_d;
  const acc_t slope = s_agh * inv_d - A1 * m1 - A2 * m2;
  acc_t s_G = 0, s_Gxh = 0;
#pragma omp simd reduction(+ : s_G, s_Gxh)
  for (int64_t i = 0; i < D; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]), xh = (static_cast<acc_t>(x[i]) - mean) * r;
    const acc_t G = norm_G(r, static_cast<acc_t>(a[i]), m2, A2, gi * static_cast<acc_t>(w[i]),
                           static_cast<acc_t>(aw[i]), gi);
    s_G += G;
    s_Gxh += G * xh;
  }
  const acc_t mG = centered ? s_G * inv_d : acc_t(0), mGxh = s_Gxh * inv_d;
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) {
    const acc_t gi = static_cast<acc_t>(g[i]), wi = static_cast<acc_t>(w[i]), ai = static_cast<acc_t>(a[i]);
    const acc_t awi = static_cast<acc_t>(aw[i]), xh = (static_cast<acc_t>(x[i]) - mean) * r;
    const acc_t dgh = norm_dgh(r, ai, A1, xh, A2);
    dg[i] = static_cast<scalar_t>(wi * dgh + awi * xh + static_cast<acc_t>(ab[i]));
    dx[i] = static_cast<scalar_t>(norm_ddx(r, norm_G(r, ai, m2, A2, gi * wi, awi, gi), mG, xh, mGxh, slope));
    pw[i] += gi * dgh;
  }
}

template <typename T>
const T* at_row(const void* base, int64_t index, int64_t D) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + index * D;
}
template <typename T>
T* at_row(void* base, int64_t index, int64_t D) {
  return static_cast<T*>(base) + index * D;
}

template <typename scalar_t>
void forward_impl(const NormArgs& a) {
  using acc_t = acc_of<scalar_t>;
  at::parallel_for(0, a.N * a.R, grain_for(a.D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / a.R;
      forward_row<scalar_t>(a.D, a.centered, static_cast<acc_t>(a.eps), at_row<scalar_t>(a.x, row, a.D),
                            at_row<scalar_t>(a.w, n, a.D), at_row<scalar_t>(a.b, n, a.D),
                            at_row<scalar_t>(a.out, row, a.D), static_cast<acc_t*>(a.mean) + row,
                            static_cast<acc_t*>(a.rstd) + row);
    }
  });
}

// Runs row_fn(row, pw, pb) over every row, one job per (task, chunk), into chunk partials of `nsums`
// weight cotangents, then writes their in-order sums to outs[0..nsums) ([N, D] each).
template <typename scalar_t, typename RowFn>
void chunked_rows(const NormArgs& a, int nsums, void* const* outs, RowFn row_fn) {
  using acc_t = acc_of<scalar_t>;
  const int64_t nchunks = norm_chunks(a.R), D = a.D;
  std::vector<acc_t> partial(static_cast<size_t>(a.N * nchunks * nsums * D), acc_t(0));
  at::parallel_for(0, a.N * nchunks, grain_for(kNormRowsPerChunk * D), [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t n = job / nchunks, r0 = (job % nchunks) * kNormRowsPerChunk;
      const int64_t r1 = std::min(a.R, r0 + kNormRowsPerChunk);
      acc_t* p = partial.data() + job * nsums * D;
      for (int64_t r = r0; r < r1; ++r) row_fn(n * a.R + r, n, p, p + D);
    }
  });
  at::parallel_for(0, a.N * D, grain_for(nchunks), [&](int64_t begin, int64_t end) {
    for (int64_t nd = begin; nd < end; ++nd) {
      const int64_t n = nd / D, d = nd % D;
      for (int s = 0; s < nsums; ++s) {
        acc_t total = 0;
        for (int64_t c = 0; c < nchunks; ++c) total += partial[((n * nchunks + c) * nsums + s) * D + d];
        static_cast<scalar_t*>(outs[s])[nd] = static_cast<scalar_t>(total);
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const NormArgs& a) {
  using acc_t = acc_of<scalar_t>;
  void* outs[2] = {a.dw, a.db};
  const acc_t* mean = static_cast<const acc_t*>(a.mean);
  const acc_t* rstd = static_cast<const acc_t*>(a.rstd);
  chunked_rows<scalar_t>(a, 2, outs, [&](int64_t row, int64_t n, acc_t* pw, acc_t* pb) {
    backward_row<scalar_t>(a.D, a.centered, mean[row], rstd[row], at_row<scalar_t>(a.g, row, a.D),
                           at_row<scalar_t>(a.x, row, a.D), at_row<scalar_t>(a.w, n, a.D),
                           at_row<scalar_t>(a.out, row, a.D), pw, pb);
  });
}

template <typename scalar_t>
void double_backward_impl(const NormArgs& a) {
  using acc_t = acc_of<scalar_t>;
  void* outs[1] = {a.dw};
  const acc_t* mean = static_cast<const acc_t*>(a.mean);
  const acc_t* rstd = static_cast<const acc_t*>(a.rstd);
  chunked_rows<scalar_t>(a, 1, outs, [&](int64_t row, int64_t n, acc_t* pw, acc_t*) {
    double_backward_row<scalar_t>(a.D, a.centered, mean[row], rstd[row], at_row<scalar_t>(a.a, row, a.D),
                                  at_row<scalar_t>(a.aw, n, a.D), at_row<scalar_t>(a.ab, n, a.D),
                                  at_row<scalar_t>(a.g, row, a.D), at_row<scalar_t>(a.x, row, a.D),
                                  at_row<scalar_t>(a.w, n, a.D), at_row<scalar_t>(a.out_g, row, a.D),
                                  at_row<scalar_t>(a.out, row, a.D), pw);
  });
}

}  // namespace

void norm_forward_cpu(DType dtype, const NormArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto s) { forward_impl<decltype(s)>(a); });
}
void norm_backward_cpu(DType dtype, const NormArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto s) { backward_impl<decltype(s)>(a); });
}
void norm_double_backward_cpu(DType dtype, const NormArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto s) { double_backward_impl<decltype(s)>(a); });
}

}  // namespace mk
