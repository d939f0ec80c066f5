// Raw-pointer entry points of the fused bias + GELU kernels (no torch headers).  x, g, a and the
// per-element outputs are contiguous [N, R, C]; b is [N, C] (every row of task n adds row n).
#pragma once

#include <cstdint>

#include "gelu_math.h"

namespace mk {

struct GeluArgs {
  int64_t N, R, C;
  bool tanh_form;
  const void* x;
  const void* b;
  const void* g;    // backward, double backward: the cotangent of y
  const void* a;    // double backward: the cotangent of dx
  void* out;        // forward: y; backward: dx; double backward: du (= the cotangent of x)
  void* out_g;      // double backward: dg
};

// Which of the three a launch computes.
enum class GeluPass : int { kForward = 0, kBackward = 1, kDoubleBackward = 2 };

void gelu_cpu(GeluPass pass, DType dtype, const GeluArgs& a);
const char* gelu_cuda(GeluPass pass, DType dtype, const GeluArgs& a, void* stream);

}  // namespace mk
