// Raw-pointer entry points of the fused update kernels (no torch headers, so nvcc compiles the CUDA
// side alone).  The bindings in python/ check and allocate tensors, then fill these structs.
//
// Layout: every operand is a contiguous row of P elements, repeated over T tasks with a row stride
// of P ([T, P] operand) or 0 ([P] operand broadcast over tasks).  The lr operand may be absent
// (nullptr), in which case UpdateHyper::lr is used for every element.
#pragma once

#include <cstdint>

#include "update_math.h"

namespace mk {

struct UpdateForwardArgs {
  int64_t T, P;
  const void* param; int64_t param_rs;
  const void* grad; int64_t grad_rs;
  const void* state[2]; int64_t state_rs[2];
  const void* lr; int64_t lr_rs;
  void* param_out;      // [T, P]
  void* state_out[2];   // [T, P] each, for the kind's states
};

// Cotangent outputs are either per task ([T, P], written per row), reduced over tasks ([P], the
// deterministic sum over t = 0..T-1 in order, accumulated in double whatever the dtype), or not
// requested (nullptr).  NOTE: summed in float32, the error grew with T: the cotangents of task-shared
// operands are sums of terms of both signs, whose running sums are ~sqrt(t) times a term, so each
// addition rounds at that scale; at T = 65,537 momentum's lr cotangent was 7.6 times the tests'
// float32 tolerance off, and still 1.2 times summed in blocks of 256 tasks.
enum class GradMode : int { kNone = 0, kPerTask = 1, kSumOverTasks = 2 };

struct UpdateBackwardArgs {
  int64_t T, P;
  // Saved forward inputs (param is not needed: dp = gp).
  const void* grad; int64_t grad_rs;
  const void* state[2]; int64_t state_rs[2];
  const void* lr; int64_t lr_rs;
  // Output cotangents, [T, P] each, or nullptr when that output received no gradient (zero).
  const void* grad_param_out;
  const void* grad_state_out[2];
  // Input cotangents.
  void* d_param; GradMode d_param_mode;  // only kSumOverTasks or kNone: per task it is gp itself
  void* d_grad; GradMode d_grad_mode;
  void* d_state[2]; GradMode d_state_mode[2];
  void* d_lr; GradMode d_lr_mode;
};

void update_forward_cpu(UpdateKind kind, DType dtype, const UpdateHyper& hyper, const UpdateForwardArgs& a);
void update_backward_cpu(UpdateKind kind, DType dtype, const UpdateHyper& hyper, const UpdateBackwardArgs& a);

// CUDA launchers (csrc/cuda/update.cu); `stream` is a cudaStream_t.  Return a CUDA error string, or
// nullptr on success.
const char* update_forward_cuda(UpdateKind kind, DType dtype, const UpdateHyper& hyper,
                                const UpdateForwardArgs& a, void* stream);
const char* update_backward_cuda(UpdateKind kind, DType dtype, const UpdateHyper& hyper,
                                 const UpdateBackwardArgs& a, void* stream);

}  // namespace mk
