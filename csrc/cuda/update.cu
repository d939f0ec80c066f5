// CUDA kernels of the fused update ops: the per-element math of csrc/update_math.h over raw pointers.
// No torch headers: `nvcc -arch=sm_90 -c csrc/cuda/update.cu` compiles this file alone.
//
// Forward: a 2-D grid, x over parameters and y over tasks; one thread per element, each element read
// once and each output written once (coalesced along the contiguous parameter axis).
// Backward: one thread per parameter index i, looping over tasks t = 0..T-1 in order: per-task
// cotangents are written row by row, and the cotangents of [P] (task-shared) inputs are summed in
// double registers in that fixed order, so the reduction is deterministic without atomics.  Without an lr
// cotangent, SGD's and momentum's backward never load the gradient or the buffer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../update_kernels.h"
#include "convert.cuh"

namespace mk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <UpdateKind kind, bool kLrTensor, typename scalar_t>
__global__ void update_forward_kernel(UpdateHyper h, UpdateForwardArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  using Math = typename UpdateMathFor<kind, acc_t>::type;
  constexpr int kStates = update_num_states(kind);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.P) return;
  const UpdateConsts<acc_t> c(h);
  for (int64_t t = blockIdx.y; t < a.T; t += gridDim.y) {
    acc_t s[2] = {acc_t(0), acc_t(0)}, s_new[2], p_new;
    for (int k = 0; k < kStates; ++k) s[k] = load<acc_t, scalar_t>(a.state[k], t * a.state_rs[k] + i);
    const acc_t lr = kLrTensor ? load<acc_t, scalar_t>(a.lr, t * a.lr_rs + i) : c.lr;
    Math::forward(c, lr, load<acc_t, scalar_t>(a.param, t * a.param_rs + i),
                  load<acc_t, scalar_t>(a.grad, t * a.grad_rs + i), s, p_new, s_new);
    store<scalar_t>(a.param_out, t * a.P + i, p_new);
    for (int k = 0; k < kStates; ++k) store<scalar_t>(a.state_out[k], t * a.P + i, s_new[k]);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void emit(GradMode mode, void* out, int64_t index, acc_t value, double& sum) {
  if (mode == GradMode::kPerTask) store<scalar_t>(out, index, value);
  else if (mode == GradMode::kSumOverTasks) sum += static_cast<double>(value);
}

// The double sum rounded to the accumulation type, then stored (as the CPU kernel does).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_sum(GradMode mode, void* out, int64_t i, double sum) {
  if (mode == GradMode::kSumOverTasks) store<scalar_t>(out, i, static_cast<acc_t>(sum));
}

template <UpdateKind kind, bool kLrTensor, bool kLrGrad, typename scalar_t>
__global__ void update_backward_kernel(UpdateHyper h, UpdateBackwardArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  using Math = typename UpdateMathFor<kind, acc_t>::type;
  constexpr int kStates = update_num_states(kind);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.P) return;
  const UpdateConsts<acc_t> c(h);
  double sum_p = 0, sum_g = 0, sum_s[2] = {0, 0}, sum_lr = 0;
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t out_index = t * a.P + i;
    acc_t s[2] = {acc_t(0), acc_t(0)}, gs[2] = {acc_t(0), acc_t(0)}, ds[2], dg, dlr;
    for (int k = 0; k < kStates; ++k) {
      s[k] = load<acc_t, scalar_t>(a.state[k], t * a.state_rs[k] + i);
      if (a.grad_state_out[k]) gs[k] = load<acc_t, scalar_t>(a.grad_state_out[k], out_index);
    }
    const acc_t gp = a.grad_param_out ? load<acc_t, scalar_t>(a.grad_param_out, out_index) : acc_t(0);
    const acc_t lr = kLrTensor ? load<acc_t, scalar_t>(a.lr, t * a.lr_rs + i) : c.lr;
    Math::backward(c, lr, load<acc_t, scalar_t>(a.grad, t * a.grad_rs + i), s, gp, gs, dg, ds, dlr);
    emit<scalar_t>(a.d_param_mode, a.d_param, out_index, gp, sum_p);
    emit<scalar_t>(a.d_grad_mode, a.d_grad, out_index, dg, sum_g);
    for (int k = 0; k < kStates; ++k) emit<scalar_t>(a.d_state_mode[k], a.d_state[k], out_index, ds[k], sum_s[k]);
    if constexpr (kLrGrad) emit<scalar_t>(a.d_lr_mode, a.d_lr, out_index, dlr, sum_lr);
  }
  store_sum<scalar_t, acc_t>(a.d_param_mode, a.d_param, i, sum_p);
  store_sum<scalar_t, acc_t>(a.d_grad_mode, a.d_grad, i, sum_g);
  for (int k = 0; k < kStates; ++k) store_sum<scalar_t, acc_t>(a.d_state_mode[k], a.d_state[k], i, sum_s[k]);
  if constexpr (kLrGrad) store_sum<scalar_t, acc_t>(a.d_lr_mode, a.d_lr, i, sum_lr);
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* update_forward_cuda(UpdateKind kind, DType dtype, const UpdateHyper& hyper,
                                const UpdateForwardArgs& a, void* stream) {
  if (a.T == 0 || a.P == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>((a.P + kThreads - 1) / kThreads),
                  static_cast<unsigned>(a.T < kMaxGridY ? a.T : kMaxGridY));
  with_update_kind(kind, [&](auto k) {
    with_bool(a.lr != nullptr, [&](auto lr_tensor) {
      with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto tag) {
        update_forward_kernel<decltype(k)::value, decltype(lr_tensor)::value, decltype(tag)>
            <<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(hyper, a);
      });
    });
  });
  return last_error();
}

const char* update_backward_cuda(UpdateKind kind, DType dtype, const UpdateHyper& hyper,
                                 const UpdateBackwardArgs& a, void* stream) {
  if (a.P == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>((a.P + kThreads - 1) / kThreads));
  with_update_kind(kind, [&](auto k) {
    with_bool(a.lr != nullptr, [&](auto lr_tensor) {
      with_bool(a.d_lr_mode != GradMode::kNone, [&](auto lr_grad) {
        with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto tag) {
          update_backward_kernel<decltype(k)::value, decltype(lr_tensor)::value, decltype(lr_grad)::value,
                                 decltype(tag)><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(hyper, a);
        });
      });
    });
  });
  return last_error();
}

}  // namespace mk
