// CUDA kernels of the vocabulary head's cross-entropy rows: one block of kThreads threads per row of
// [M, V], each thread reducing its strided columns in order and the block combining them with a fixed
// shared-memory tree (deterministic); the math of csrc/xent_kernels.h.  No torch headers: `nvcc
// -arch=sm_90 -c csrc/cuda/xent.cu` compiles it alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../xent_kernels.h"
#include "block_reduce.cuh"
#include "convert.cuh"

namespace mk {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void xent_kernel(XentPass pass, XentArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = blockIdx.x, base = row * a.V;
  if (pass == XentPass::kForward) {
    acc_t m[1] = {-INFINITY};
    for (int64_t j = threadIdx.x; j < a.V; j += kThreads) m[0] = fmax(m[0], load<acc_t, scalar_t>(a.z, base + j));
    block_reduce<kThreads>(m, Max{});
    acc_t s[1] = {0};
    if (!isinf(m[0]))
      for (int64_t j = threadIdx.x; j < a.V; j += kThreads) s[0] += exp(load<acc_t, scalar_t>(a.z, base + j) - m[0]);
    block_reduce<kThreads>(s, Sum{});
    if (threadIdx.x == 0) store<scalar_t>(a.out, row, isinf(m[0]) ? m[0] : m[0] + log(s[0]));
    return;
  }
  const acc_t lse = load<acc_t, scalar_t>(a.lse, row), c = load<acc_t, scalar_t>(a.c, row);
  const int64_t y = a.y[row];
  if (pass == XentPass::kBackward) {
    for (int64_t j = threadIdx.x; j < a.V; j += kThreads) {
      const acc_t p = exp(load<acc_t, scalar_t>(a.z, base + j) - lse);
      store<scalar_t>(a.z, base + j, c * (j == y ? p - acc_t(1) : p));
    }
    return;
  }
  acc_t sums[1] = {0};
  for (int64_t j = threadIdx.x; j < a.V; j += kThreads)
    sums[0] += exp(load<acc_t, scalar_t>(a.z, base + j) - lse) * load<acc_t, scalar_t>(a.u, base + j);
  block_reduce<kThreads>(sums, Sum{});
  const acc_t pu = sums[0];
  const acc_t u_y = load<acc_t, scalar_t>(a.u, base + y);
  __syncthreads();  // every thread has read u_y before any overwrites it
  for (int64_t j = threadIdx.x; j < a.V; j += kThreads) {
    const acc_t p = exp(load<acc_t, scalar_t>(a.z, base + j) - lse);
    store<scalar_t>(a.u, base + j, c * (load<acc_t, scalar_t>(a.u, base + j) - pu) * p);
    store<scalar_t>(a.z, base + j, c * (j == y ? p - acc_t(1) : p));
  }
  if (threadIdx.x == 0) store<scalar_t>(a.out, row, pu - u_y);
}

}  // namespace

const char* xent_cuda(XentPass pass, DType dtype, const XentArgs& a, void* stream) {
  if (a.M * a.V == 0) return nullptr;
  if (a.M > 2147483647LL) return "more than 2^31 - 1 rows";
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto v) {
    xent_kernel<decltype(v)><<<a.M, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(pass, a);
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mk
