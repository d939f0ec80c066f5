// CPU kernel of the fused bias + GELU: one element-wise pass per call over [N, R, C], threaded over
// rows with at::parallel_for, each output written once (math in csrc/gelu_math.h), the row loops
// vectorised with libmvec's exp / tanh / erf where available (vector_math.h).
//   forward:          y  = gelu(x + b)
//   backward:         dx = g gelu'(u)
//   double backward:  dg = a gelu'(u),  du = a g gelu''(u)  (a: the cotangent of dx)
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "../dispatch.h"
#include "../gelu_kernels.h"
#include "clones.h"
#include "parallel.h"
#include "vector_math.h"

namespace mk {
namespace {

template <GeluPass pass, bool kTanh, typename scalar_t>
MK_CPU_CLONES void gelu_row(int64_t C, const scalar_t* __restrict__ x, const scalar_t* __restrict__ b,
                            const scalar_t* __restrict__ g, const scalar_t* __restrict__ a,
                            scalar_t* __restrict__ out, scalar_t* __restrict__ out_g) {
  using acc_t = acc_of<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const GeluValues<acc_t> v = gelu_values(static_cast<acc_t>(x[i]) + static_cast<acc_t>(b[i]), kTanh);
    if constexpr (pass == GeluPass::kForward) {
      out[i] = static_cast<scalar_t>(v.value);
    } else if constexpr (pass == GeluPass::kBackward) {
      out[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * v.d1);
    } else {
      const acc_t ai = static_cast<acc_t>(a[i]);
      out_g[i] = static_cast<scalar_t>(ai * v.d1);
      out[i] = static_cast<scalar_t>(ai * static_cast<acc_t>(g[i]) * v.d2);
    }
  }
}

template <typename T>
const T* offset_ptr(const void* base, int64_t offset) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + offset;
}

template <GeluPass pass, bool kTanh, typename scalar_t>
void gelu_impl(const GeluArgs& a) {
  at::parallel_for(0, a.N * a.R, grain_for(a.C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t e = row * a.C, n = row / a.R;
      gelu_row<pass, kTanh, scalar_t>(a.C, offset_ptr<scalar_t>(a.x, e), offset_ptr<scalar_t>(a.b, n * a.C),
                               offset_ptr<scalar_t>(a.g, e), offset_ptr<scalar_t>(a.a, e),
                               static_cast<scalar_t*>(a.out) + e,
                               a.out_g == nullptr ? nullptr : static_cast<scalar_t*>(a.out_g) + e);
    }
  });
}

}  // namespace

void gelu_cpu(GeluPass pass, DType dtype, const GeluArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto s) {
    using scalar_t = decltype(s);
    with_bool(a.tanh_form, [&](auto tanh_form) {
      switch (pass) {
        case GeluPass::kForward: return gelu_impl<GeluPass::kForward, tanh_form.value, scalar_t>(a);
        case GeluPass::kBackward: return gelu_impl<GeluPass::kBackward, tanh_form.value, scalar_t>(a);
        case GeluPass::kDoubleBackward: return gelu_impl<GeluPass::kDoubleBackward, tanh_form.value, scalar_t>(a);
      }
    });
  });
}

}  // namespace mk
