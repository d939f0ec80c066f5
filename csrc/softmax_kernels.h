// The fused causal softmax (metakernels/ops/softmax.py has the derivation): per-element math shared by
// the C++ CPU loops and the CUDA kernels, and the raw-pointer entry points (no torch headers).
//
// Layout: scores, p, g, a and the outputs are contiguous [N, S_q, S_k]; row r is query i = r % S_q,
// which sees the keys j < i + S_k - S_q + 1.  Per row, c = <p, g> and A = <p, a>:
//   forward          p  = exp(scale s - max) / Z over the visible keys, 0 elsewhere
//   backward         ds = scale p (g - c)
//   double backward  dg = scale p (a - A),  dp = scale (a (g - c) - A g)
#pragma once

#include <cstdint>

#include "update_math.h"  // MK_HOST_DEVICE, DType, AccType

namespace mk {

template <typename acc_t>
MK_HOST_DEVICE inline acc_t softmax_ds(acc_t scale, acc_t p, acc_t g, acc_t c) {
  return scale * p * (g - c);
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t softmax_ddg(acc_t scale, acc_t p, acc_t a, acc_t A) {
  return scale * p * (a - A);
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t softmax_ddp(acc_t scale, acc_t a, acc_t g, acc_t c, acc_t A) {
  return scale * (a * (g - c) - A * g);
}

// The number of keys row r sees.
MK_HOST_DEVICE inline int64_t softmax_visible(int64_t row, int64_t Sq, int64_t Sk) {
  return row % Sq + Sk - Sq + 1;
}

struct SoftmaxArgs {
  int64_t N, Sq, Sk;
  double scale;
  const void* s;  // forward: the scores
  const void* p;  // backward, double backward: the forward's output
  const void* g;  // backward, double backward: the cotangent of p
  const void* a;  // double backward: the cotangent of ds
  void* out;      // forward: p; backward: ds; double backward: dg
  void* out2;     // double backward: dp
};

enum class SoftmaxPass : int { kForward = 0, kBackward = 1, kDoubleBackward = 2 };

void softmax_cpu(SoftmaxPass pass, DType dtype, const SoftmaxArgs& a);
const char* softmax_cuda(SoftmaxPass pass, DType dtype, const SoftmaxArgs& a, void* stream);

}  // namespace mk
