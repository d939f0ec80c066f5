// Host-side helpers that turn the runtime (kind, lr-is-a-tensor, dtype) of a call into the compile-time
// template arguments of a kernel, for the CPU and the CUDA backends alike.
#pragma once

#include <type_traits>

#include "update_math.h"

namespace mk {

template <typename F>
void with_update_kind(UpdateKind kind, F&& f) {
  switch (kind) {
    case UpdateKind::kSgd: return f(std::integral_constant<UpdateKind, UpdateKind::kSgd>{});
    case UpdateKind::kMomentum: return f(std::integral_constant<UpdateKind, UpdateKind::kMomentum>{});
    case UpdateKind::kAdam: return f(std::integral_constant<UpdateKind, UpdateKind::kAdam>{});
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) return f(std::true_type{});
  return f(std::false_type{});
}

// Calls f with a value of the backend's storage type for `dtype` (types listed in DType order).
template <typename F32, typename F64, typename BF16, typename F16, typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(F32{});
    case DType::kFloat64: return f(F64{});
    case DType::kBFloat16: return f(BF16{});
    case DType::kFloat16: return f(F16{});
  }
}

}  // namespace mk
