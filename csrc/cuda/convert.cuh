// Loads and stores between a storage dtype and the accumulation type, for the CUDA kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace mk {

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load(const void* base, int64_t index) {
  return static_cast<acc_t>(static_cast<const scalar_t*>(base)[index]);
}
// torch builds with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__, so 16-bit types convert explicitly.
template <>
__device__ __forceinline__ float load<float, __nv_bfloat16>(const void* base, int64_t index) {
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
}
template <>
__device__ __forceinline__ float load<float, __half>(const void* base, int64_t index) {
  return __half2float(static_cast<const __half*>(base)[index]);
}
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store(void* base, int64_t index, acc_t value) {
  static_cast<scalar_t*>(base)[index] = static_cast<scalar_t>(value);
}
template <>
__device__ __forceinline__ void store<__nv_bfloat16, float>(void* base, int64_t index, float value) {
  static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16(value);
}
template <>
__device__ __forceinline__ void store<__half, float>(void* base, int64_t index, float value) {
  static_cast<__half*>(base)[index] = __float2half(value);
}

}  // namespace mk
