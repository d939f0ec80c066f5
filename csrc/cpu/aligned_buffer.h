// Heap scratch on cache-line boundaries for the CPU kernels' vector loops.
//
// std::vector takes its memory from malloc, which aligns to 16 bytes. A 64-byte AVX-512 load or store at a
// 16-byte offset spans two cache lines and costs two L1 accesses. In the learned optimizer's element-major
// MLP (hidden=32, one thread, L1-resident operands) scratch 16 bytes off a line made the input cotangents
// 12-25% and the weight gradient 10-13% slower (benchmarks/RESULTS.md, nineteenth session).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace mk {

constexpr std::size_t kCacheLineBytes = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLineBytes}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{kCacheLineBytes}); }
  friend bool operator==(const CacheLineAllocator&, const CacheLineAllocator&) { return true; }
};

// A std::vector whose data() is 64-byte aligned.
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace mk
