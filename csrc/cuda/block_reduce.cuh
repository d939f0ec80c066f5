// A deterministic block-wide reduction for the CUDA row kernels (one block per row): kVals values per
// thread combined over the block's kThreads threads with a fixed shared-memory tree.
#pragma once

#include <cuda_runtime.h>

namespace mk {

// Reduces kVals values over the block with `op`; every thread gets the results.
template <int kThreads, int kVals, typename acc_t, typename Op>
__device__ void block_reduce(acc_t (&v)[kVals], Op op) {
  __shared__ acc_t shared[kVals][kThreads];
  for (int k = 0; k < kVals; ++k) shared[k][threadIdx.x] = v[k];
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width)
      for (int k = 0; k < kVals; ++k) shared[k][threadIdx.x] = op(shared[k][threadIdx.x], shared[k][threadIdx.x + width]);
    __syncthreads();
  }
  for (int k = 0; k < kVals; ++k) v[k] = shared[k][0];
  __syncthreads();
}

struct Sum {
  template <typename T> __device__ T operator()(T x, T y) const { return x + y; }
};
struct Max {
  template <typename T> __device__ T operator()(T x, T y) const { return x > y ? x : y; }
};

}  // namespace mk
