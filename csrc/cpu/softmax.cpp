// CPU kernels of the fused causal softmax: one job per row of [N, S_q, S_k] (at::parallel_for), the
// per-element math of csrc/softmax_kernels.h in `omp simd` loops (exp from libmvec where available).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../dispatch.h"
#include "../softmax_kernels.h"
#include "clones.h"
#include "parallel.h"
#include "vector_math.h"

namespace mk {
namespace {

template <typename scalar_t>
MK_CPU_CLONES void forward_row(int64_t Sk, int64_t visible, acc_of<scalar_t> scale, const scalar_t* __restrict__ s,
                               scalar_t* __restrict__ p) {
  using acc_t = acc_of<scalar_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), z = 0;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < visible; ++j) m = std::max(m, scale * static_cast<acc_t>(s[j]));
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < visible; ++j) z += std::exp(scale * static_cast<acc_t>(s[j]) - m);
  const acc_t inv_z = acc_t(1) / z;
#pragma omp simd
  for (int64_t j = 0; j < visible; ++j) p[j] = static_cast<scalar_t>(std::exp(scale * static_cast<acc_t>(s[j]) - m) * inv_z);
  for (int64_t j = visible; j < Sk; ++j) p[j] = static_cast<scalar_t>(0);
}

template <typename scalar_t>
MK_CPU_CLONES void backward_row(int64_t Sk, acc_of<scalar_t> scale, const scalar_t* __restrict__ p,
                                const scalar_t* __restrict__ g, scalar_t* __restrict__ ds) {
  using acc_t = acc_of<scalar_t>;
  acc_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t j = 0; j < Sk; ++j) c += static_cast<acc_t>(p[j]) * static_cast<acc_t>(g[j]);
#pragma omp simd
  for (int64_t j = 0; j < Sk; ++j)
    ds[j] = static_cast<scalar_t>(softmax_ds(scale, static_cast<acc_t>(p[j]), static_cast<acc_t>(g[j]), c));
}

template <typename scalar_t>
MK_CPU_CLONES void double_backward_row(int64_t Sk, acc_of<scalar_t> scale, const scalar_t* __restrict__ p,
                                       const scalar_t* __restrict__ g, const scalar_t* __restrict__ a,
                                       scalar_t* __restrict__ dg, scalar_t* __restrict__ dp) {
  using acc_t = acc_of<scalar_t>;
  acc_t c = 0, A = 0;
#pragma omp simd reduction(+ : c, A)
  for (int64_t j = 0; j < Sk; ++j) {
    const acc_t pj = static_cast<acc_t>(p[j]);
    c += pj * static_cast<acc_t>(g[j]);
    A += pj * static_cast<acc_t>(a[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < Sk; ++j) {
    const acc_t pj = static_cast<acc_t>(p[j]), gj = static_cast<acc_t>(g[j]), aj = static_cast<acc_t>(a[j]);
    dg[j] = static_cast<scalar_t>(softmax_ddg(scale, pj, aj, A));
    dp[j] = static_cast<scalar_t>(softmax_ddp(scale, aj, gj, c, A));
  }
}

template <typename scalar_t>
void softmax_impl(SoftmaxPass pass, const SoftmaxArgs& a) {
  using acc_t = acc_of<scalar_t>;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const int64_t Sk = a.Sk;
  auto in = [&](const void* base, int64_t row) { return static_cast<const scalar_t*>(base) + row * Sk; };
  auto out = [&](void* base, int64_t row) { return static_cast<scalar_t*>(base) + row * Sk; };
  at::parallel_for(0, a.N * a.Sq, grain_for(Sk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (pass == SoftmaxPass::kForward) {
        forward_row<scalar_t>(Sk, softmax_visible(row, a.Sq, Sk), scale, in(a.s, row), out(a.out, row));
      } else if (pass == SoftmaxPass::kBackward) {
        backward_row<scalar_t>(Sk, scale, in(a.p, row), in(a.g, row), out(a.out, row));
      } else {
        double_backward_row<scalar_t>(Sk, scale, in(a.p, row), in(a.g, row), in(a.a, row), out(a.out, row),
                                      out(a.out2, row));
      }
    }
  });
}

}  // namespace

void softmax_cpu(SoftmaxPass pass, DType dtype, const SoftmaxArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto s) { softmax_impl<decltype(s)>(pass, a); });
}

}  // namespace mk
