// CUDA kernels of the fused causal softmax: one block of kThreads threads per row of [N, S_q, S_k], each
// thread reducing its strided keys in order and the block combining them with a fixed shared-memory tree
// (deterministic); the per-element math of csrc/softmax_kernels.h.  No torch headers: `nvcc -arch=sm_90
// -c csrc/cuda/softmax.cu` compiles it alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../softmax_kernels.h"
#include "block_reduce.cuh"
#include "convert.cuh"

namespace mk {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void softmax_kernel(SoftmaxPass pass, SoftmaxArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = blockIdx.x, base = row * a.Sk;
  const acc_t scale = static_cast<acc_t>(a.scale);
  if (pass == SoftmaxPass::kForward) {
    const int64_t visible = softmax_visible(row, a.Sq, a.Sk);
    acc_t m[1] = {-INFINITY};
    for (int64_t j = threadIdx.x; j < visible; j += kThreads) m[0] = fmax(m[0], scale * load<acc_t, scalar_t>(a.s, base + j));
    block_reduce<kThreads>(m, Max{});
    acc_t z[1] = {0};
    for (int64_t j = threadIdx.x; j < visible; j += kThreads) z[0] += exp(scale * load<acc_t, scalar_t>(a.s, base + j) - m[0]);
    block_reduce<kThreads>(z, Sum{});
    for (int64_t j = threadIdx.x; j < a.Sk; j += kThreads)
      store<scalar_t>(a.out, base + j, j < visible ? exp(scale * load<acc_t, scalar_t>(a.s, base + j) - m[0]) / z[0] : acc_t(0));
    return;
  }
  acc_t r[2] = {0, 0};  // c = <p, g>, A = <p, a>
  for (int64_t j = threadIdx.x; j < a.Sk; j += kThreads) {
    const acc_t p = load<acc_t, scalar_t>(a.p, base + j);
    r[0] += p * load<acc_t, scalar_t>(a.g, base + j);
    if (pass == SoftmaxPass::kDoubleBackward) r[1] += p * load<acc_t, scalar_t>(a.a, base + j);
  }
  block_reduce<kThreads>(r, Sum{});
  for (int64_t j = threadIdx.x; j < a.Sk; j += kThreads) {
    const acc_t p = load<acc_t, scalar_t>(a.p, base + j), g = load<acc_t, scalar_t>(a.g, base + j);
    if (pass == SoftmaxPass::kBackward) {
      store<scalar_t>(a.out, base + j, softmax_ds(scale, p, g, r[0]));
    } else {
      const acc_t av = load<acc_t, scalar_t>(a.a, base + j);
      store<scalar_t>(a.out, base + j, softmax_ddg(scale, p, av, r[1]));
      store<scalar_t>(a.out2, base + j, softmax_ddp(scale, av, g, r[0], r[1]));
    }
  }
}

}  // namespace

const char* softmax_cuda(SoftmaxPass pass, DType dtype, const SoftmaxArgs& a, void* stream) {
  if (a.N * a.Sq * a.Sk == 0) return nullptr;
  if (a.N * a.Sq > 2147483647LL) return "more than 2^31 - 1 rows";
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto v) {
    softmax_kernel<decltype(v)><<<a.N * a.Sq, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(pass, a);
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mk
