// CPU stand-in for cuda_fp16.h (see cuda_runtime.h here): __half as 16-bit storage, converted by GCC's
// _Float16 (round to nearest even, as __float2half).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
  // No conversion from a number (__CUDA_NO_HALF_CONVERSIONS__, as torch builds): see cuda_bf16.h.
  __half() = default;
  template <typename T>
  __half(T) = delete;
};

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}

inline __half __float2half(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
