// Shared by the CPU kernels: how finely at::parallel_for splits work, and the accumulation type.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../update_math.h"  // AccType

namespace mk {

// Elements per thread below which at::parallel_for stays on one thread (ATen's own GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

// The at::parallel_for grain, in items, for items of `elements_per_item` elements each.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(elements_per_item, 1));
}

template <typename scalar_t>
using acc_of = typename AccType<scalar_t>::type;

}  // namespace mk
