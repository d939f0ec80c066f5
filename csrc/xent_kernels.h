// The vocabulary head's cross-entropy row kernels (metakernels/ops/xent.py has the math): the raw-pointer
// entry points (no torch headers) of the element-wise passes over one chunk of logits, in place.
//
// Layout: z (logits) and u (their tangent) are contiguous [M, V]; lse, c (a coefficient per row) and the
// outputs are contiguous [M] of z's dtype; y holds M int64 targets in [0, V).  Per row:
//   forward          lse = log sum_j exp(z_j)
//   backward         z_j <- c (exp(z_j - lse) - [j = y])                                   (delta)
//   double backward  p_j = exp(z_j - lse), pu = <p, u>:  out = pu - u_y,
//                    u_j <- c (u_j - pu) p_j  (s),   z_j <- c (p_j - [j = y])  (delta)
// p is recomputed from z where a second pass needs it (never stored rounded to z's dtype).
#pragma once

#include <cstdint>

#include "update_math.h"  // MK_HOST_DEVICE, DType, AccType

namespace mk {

struct XentArgs {
  int64_t M, V;
  void* z;
  void* u;             // double backward
  const void* lse;     // backward, double backward
  const int64_t* y;    // backward, double backward
  const void* c;       // backward, double backward
  void* out;           // forward: lse; double backward: pu - u_y
};

enum class XentPass : int { kForward = 0, kBackward = 1, kDoubleBackward = 2 };

void xent_cpu(XentPass pass, DType dtype, const XentArgs& a);
const char* xent_cuda(XentPass pass, DType dtype, const XentArgs& a, void* stream);

}  // namespace mk
