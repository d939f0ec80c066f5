// Per-element math of the fused bias + GELU op (metakernels/ops/gelu.py), shared by the C++ CPU loop and
// the CUDA kernel.  u = x + b;  erf form: gelu(u) = u Phi(u);  tanh form: gelu(u) = u (1 + tanh(s)) / 2
// with s = c (u + k u^3), c = sqrt(2 / pi), k = 0.044715.  First and second derivatives:
//   erf:  gelu'(u) = Phi(u) + u phi(u)                  gelu''(u) = phi(u) (2 - u^2)
//   tanh: gelu'(u) = (1 + t) / 2 + u (1 - t^2) s' / 2   gelu''(u) = (1 - t^2) (s' - u t s'^2 + 3 c k u^2)
//         with t = tanh(s), s' = c (1 + 3 k u^2).
#pragma once

#include <cmath>

#include "update_math.h"  // MK_HOST_DEVICE, DType, AccType

namespace mk {

template <typename acc_t>
struct GeluValues {
  acc_t value, d1, d2;  // gelu(u), gelu'(u), gelu''(u)
};

template <typename acc_t>
MK_HOST_DEVICE inline GeluValues<acc_t> gelu_values(acc_t u, bool tanh_form) {
  if (tanh_form) {
    const acc_t c = acc_t(0.7978845608028654), k = acc_t(0.044715);
    const acc_t u2 = u * u, t = std::tanh(c * (u + k * u2 * u)), ds = c * (acc_t(1) + acc_t(3) * k * u2);
    const acc_t sech2 = acc_t(1) - t * t;
    return {acc_t(0.5) * u * (acc_t(1) + t), acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * u * sech2 * ds,
            sech2 * (ds - u * t * ds * ds + acc_t(3) * c * k * u2)};
  }
  const acc_t phi = acc_t(0.3989422804014327) * std::exp(acc_t(-0.5) * u * u);
  const acc_t Phi = acc_t(0.5) * (acc_t(1) + std::erf(u * acc_t(0.7071067811865476)));
  return {u * Phi, Phi + u * phi, phi * (acc_t(2) - u * u)};
}

}  // namespace mk
