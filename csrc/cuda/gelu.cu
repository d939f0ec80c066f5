// CUDA kernel of the fused bias + GELU: one thread per element of [N, R, C], the math of
// csrc/gelu_math.h.  No torch headers: `nvcc -arch=sm_90 -c csrc/cuda/gelu.cu` compiles it alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../gelu_kernels.h"
#include "convert.cuh"

namespace mk {
namespace {

constexpr int kThreads = 256;

template <GeluPass pass, typename scalar_t>
__global__ void gelu_kernel(GeluArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t total = a.N * a.R * a.C;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t col = e % a.C, bi = (e / (a.R * a.C)) * a.C + col;
    const GeluValues<acc_t> v =
        gelu_values(load<acc_t, scalar_t>(a.x, e) + load<acc_t, scalar_t>(a.b, bi), a.tanh_form);
    if (pass == GeluPass::kForward) {
      store<scalar_t>(a.out, e, v.value);
    } else if (pass == GeluPass::kBackward) {
      store<scalar_t>(a.out, e, load<acc_t, scalar_t>(a.g, e) * v.d1);
    } else {
      const acc_t ai = load<acc_t, scalar_t>(a.a, e);
      store<scalar_t>(a.out_g, e, ai * v.d1);
      store<scalar_t>(a.out, e, ai * load<acc_t, scalar_t>(a.g, e) * v.d2);
    }
  }
}

}  // namespace

const char* gelu_cuda(GeluPass pass, DType dtype, const GeluArgs& a, void* stream) {
  const int64_t total = a.N * a.R * a.C;
  if (total == 0) return nullptr;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535 * 8));
  auto s = static_cast<cudaStream_t>(stream);
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto v) {
    using scalar_t = decltype(v);
    switch (pass) {
      case GeluPass::kForward: return gelu_kernel<GeluPass::kForward, scalar_t><<<blocks, kThreads, 0, s>>>(a);
      case GeluPass::kBackward: return gelu_kernel<GeluPass::kBackward, scalar_t><<<blocks, kThreads, 0, s>>>(a);
      case GeluPass::kDoubleBackward:
        return gelu_kernel<GeluPass::kDoubleBackward, scalar_t><<<blocks, kThreads, 0, s>>>(a);
    }
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mk
