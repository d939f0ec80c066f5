// CPU kernels of the vocabulary head's cross-entropy rows: one job per row of [M, V] (at::parallel_for),
// each pass over the row an `omp simd` loop (exp from libmvec where available); a row of a 32k vocabulary
// (128 KB in fp32) stays in L2 between a kernel's passes.  The math: csrc/xent_kernels.h.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../dispatch.h"
#include "../xent_kernels.h"
#include "clones.h"
#include "parallel.h"
#include "vector_math.h"

namespace mk {
namespace {

template <typename scalar_t>
MK_CPU_CLONES acc_of<scalar_t> lse_row(int64_t V, const scalar_t* __restrict__ z) {
  using acc_t = acc_of<scalar_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = std::max(m, static_cast<acc_t>(z[j]));
  if (std::isinf(m)) return m;  // every logit -inf (lse -inf) or one +inf (lse +inf), as torch.logsumexp
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<acc_t>(z[j]) - m);
  return m + std::log(s);
}

template <typename scalar_t>
MK_CPU_CLONES void backward_row(int64_t V, acc_of<scalar_t> lse, int64_t y, acc_of<scalar_t> c,
                                scalar_t* __restrict__ z) {
  using acc_t = acc_of<scalar_t>;
  const acc_t p_y = std::exp(static_cast<acc_t>(z[y]) - lse);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) z[j] = static_cast<scalar_t>(c * std::exp(static_cast<acc_t>(z[j]) - lse));
  z[y] = static_cast<scalar_t>(c * (p_y - acc_t(1)));
}

template <typename scalar_t>
MK_CPU_CLONES acc_of<scalar_t> double_backward_row(int64_t V, acc_of<scalar_t> lse, int64_t y, acc_of<scalar_t> c,
                                                   scalar_t* __restrict__ z, scalar_t* __restrict__ u) {
  using acc_t = acc_of<scalar_t>;
  acc_t pu = 0;
#pragma omp simd reduction(+ : pu)
  for (int64_t j = 0; j < V; ++j) pu += std::exp(static_cast<acc_t>(z[j]) - lse) * static_cast<acc_t>(u[j]);
  const acc_t u_y = static_cast<acc_t>(u[y]), p_y = std::exp(static_cast<acc_t>(z[y]) - lse);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const acc_t p = std::exp(static_cast<acc_t>(z[j]) - lse);
    u[j] = static_cast<scalar_t>(c * (static_cast<acc_t>(u[j]) - pu) * p);
    z[j] = static_cast<scalar_t>(c * p);
  }
  z[y] = static_cast<scalar_t>(c * (p_y - acc_t(1)));
  return pu - u_y;
}

template <typename scalar_t>
void xent_impl(XentPass pass, const XentArgs& a) {
  using acc_t = acc_of<scalar_t>;
  const int64_t V = a.V;
  const auto row_of = [&](void* base, int64_t row) { return static_cast<scalar_t*>(base) + row * V; };
  const auto at_row = [&](const void* base, int64_t row) { return static_cast<acc_t>(static_cast<const scalar_t*>(base)[row]); };
  scalar_t* out = static_cast<scalar_t*>(a.out);
  at::parallel_for(0, a.M, grain_for(V), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (pass == XentPass::kForward) {
        out[row] = static_cast<scalar_t>(lse_row<scalar_t>(V, row_of(a.z, row)));
      } else if (pass == XentPass::kBackward) {
        backward_row<scalar_t>(V, at_row(a.lse, row), a.y[row], at_row(a.c, row), row_of(a.z, row));
      } else {
        out[row] = static_cast<scalar_t>(double_backward_row<scalar_t>(V, at_row(a.lse, row), a.y[row], at_row(a.c, row),
                                                                       row_of(a.z, row), row_of(a.u, row)));
      }
    }
  });
}

}  // namespace

void xent_cpu(XentPass pass, DType dtype, const XentArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto s) { xent_impl<decltype(s)>(pass, a); });
}

}  // namespace mk
