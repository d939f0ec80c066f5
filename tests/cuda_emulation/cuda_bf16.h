// CPU stand-in for cuda_bf16.h (see cuda_runtime.h here): __nv_bfloat16 as the upper 16 bits of a float,
// rounded to nearest even as __float2bfloat16 (NaN kept NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
  // As in torch's CUDA builds (__CUDA_NO_BFLOAT16_CONVERSIONS__), no conversion from a number: a kernel that
  // stores a float without __float2bfloat16 (or a double where it meant a float) does not compile.
  __nv_bfloat16() = default;
  template <typename T>
  __nv_bfloat16(T) = delete;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  __nv_bfloat16 h;
  h.bits = std::isnan(f) ? uint16_t{0x7fc0} : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  return h;
}
