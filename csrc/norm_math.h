// Per-element math of the fused LayerNorm / RMSNorm ops (metakernels/ops/norm.py has the derivation),
// shared by the C++ CPU loops and the CUDA kernels.  Per row of D elements, with xh = (x - mean) r:
//
//   forward          y  = xh w + b
//   backward         dx = r (gh - m1 - xh m2)                       gh = g w, m1 = mean(gh), m2 = mean(gh xh)
//   double backward  dg = w r (a - A1 - xh A2) + aw xh + ab         A1 = mean(a), A2 = mean(a xh)
//                    G  = -r (a m2 + A2 gh) + aw g                  (cotangent of xh at fixed r)
//                    dx = r (G - mG - xh mGxh) - r^2 xh slope       mG = mean(G), mGxh = mean(G xh),
//                                                                   slope = mean(a gh) - A1 m1 - A2 m2
// RMSNorm is the same with mean = m1 = A1 = mG = 0 and no bias.
#pragma once

#include "update_math.h"  // MK_HOST_DEVICE, DType, AccType

namespace mk {

template <typename acc_t>
MK_HOST_DEVICE inline acc_t norm_y(acc_t xh, acc_t w, acc_t b) {
  return xh * w + b;
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t norm_dx(acc_t r, acc_t gh, acc_t m1, acc_t xh, acc_t m2) {
  return r * (gh - m1 - xh * m2);
}

// r (a - A1 - xh A2): the cotangent of gh; dg = w * this + aw xh + ab and dw accumulates g * this.
template <typename acc_t>
MK_HOST_DEVICE inline acc_t norm_dgh(acc_t r, acc_t a, acc_t A1, acc_t xh, acc_t A2) {
  return r * (a - A1 - xh * A2);
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t norm_G(acc_t r, acc_t a, acc_t m2, acc_t A2, acc_t gh, acc_t aw, acc_t g) {
  return -r * (a * m2 + A2 * gh) + aw * g;
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t norm_ddx(acc_t r, acc_t G, acc_t mG, acc_t xh, acc_t mGxh, acc_t slope) {
  return r * (G - mG - xh * mGxh) - r * r * xh * slope;
}

}  // namespace mk
