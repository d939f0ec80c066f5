// CUDA kernels of the vocabulary head's cross-entropy rows: one block of kThreads threads per row of
// [M, V], each thread reducing its strided columns in order and the block combining them with a fixed
// shared-memory tree (deterministic); the math of csrc/xent_kernels.h.  No torch headers: `nvcc
// -arch=sm_90 -c csrc/cuda/xent.cu` compiles it alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../xent_kernels.h"
#include "convert.cuh"

namespace mk {
namespace {

constexpr int kThreads = 256;

// Reduces v over the block with `op` (a fixed tree); every thread gets the result.
template <typename acc_t, typename Op>
__device__ acc_t block_reduce(acc_t v, Op op) {
  __shared__ acc_t shared[kThreads];
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + width]);
    __syncthreads();
  }
  const acc_t result = shared[0];
  __syncthreads();
  return result;
}

struct Sum {
  template <typename T> __device__ T operator()(T x, T y) const { return x + y; }
};
struct Max {
  template <typename T> __device__ T operator()(T x, T y) const { return x > y ? x : y; }
};

template <typename scalar_t>
__global__ void xent_kernel(XentPass pass, XentArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = blockIdx.x, base = row * a.V;
  if (pass == XentPass::kForward) {
    acc_t m = -INFINITY;
    for (int64_t j = threadIdx.x; j < a.V; j += kThreads) m = fmax(m, load<acc_t, scalar_t>(a.z, base + j));
    m = block_reduce(m, Max{});
    acc_t s = 0;
    if (!isinf(m))
      for (int64_t j = threadIdx.x; j < a.V; j += kThreads) s += exp(load<acc_t, scalar_t>(a.z, base + j) - m);
    s = block_reduce(s, Sum{});
    if (threadIdx.x == 0) store<scalar_t>(a.out, row, isinf(m) ? m : m + log(s));
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
  acc_t pu = 0;
  for (int64_t j = threadIdx.x; j < a.V; j += kThreads)
    pu += exp(load<acc_t, scalar_t>(a.z, base + j) - lse) * load<acc_t, scalar_t>(a.u, base + j);
  pu = block_reduce(pu, Sum{});
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
