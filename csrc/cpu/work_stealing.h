// Contiguous work stealing on at::parallel_for's threads, for item loops whose items may run on any thread
// (each item writes only its own outputs, so the result does not depend on which thread ran it).
//
// Each worker owns a contiguous range of items and walks it front to back, as at::parallel_for's static split
// does, so it streams one long range of memory.  A worker whose range is done takes the back half of the
// largest range left and walks that front to back.  So a thread slowed by another tenant of the machine no
// longer holds the others at the end of the loop, and the threads never interleave single items (which cost
// the learned optimizer's jobs their long sequential streams: RESULTS.md, "jobs from a shared counter").
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>

namespace mk {

// A worker's range [begin, end) of item indices packed into one word, so that its owner taking the front item
// and a thief taking the back half are each one compare-and-swap.
class StealableRanges {
 public:
  StealableRanges(int64_t items, int workers) : workers_(workers), ranges_(new Slot[workers]) {
    if (items >= (int64_t{1} << 32)) throw std::invalid_argument("parallel_for_stealing: more than 2^32 items");
    for (int w = 0; w < workers; ++w) ranges_[w].packed.store(pack(items * w / workers, items * (w + 1) / workers));
  }

  // The next item for worker w: its own range's front, else the front of a range stolen for it; -1 when no
  // range has an item left.
  int64_t next(int w) {
    for (;;) {
      const int64_t item = take_front(w);
      if (item >= 0) return item;
      if (!steal_into(w)) return -1;
    }
  }

 private:
  struct alignas(64) Slot {  // one cache line each: the owner's CAS does not invalidate its neighbours'
    std::atomic<uint64_t> packed;
  };
  static uint64_t pack(int64_t begin, int64_t end) {
    return static_cast<uint64_t>(begin) << 32 | static_cast<uint64_t>(end);
  }
  static int64_t begin_of(uint64_t r) { return static_cast<int64_t>(r >> 32); }
  static int64_t end_of(uint64_t r) { return static_cast<int64_t>(r & 0xffffffffu); }

  int64_t take_front(int w) {
    uint64_t r = ranges_[w].packed.load(std::memory_order_relaxed);
    while (begin_of(r) < end_of(r))
      if (ranges_[w].packed.compare_exchange_weak(r, pack(begin_of(r) + 1, end_of(r)), std::memory_order_relaxed))
        return begin_of(r);
    return -1;
  }

  // Moves the back half of the largest other range (its last item, when one is left) into w's range, which is
  // empty; false when every range is empty.
  bool steal_into(int w) {
    for (;;) {
      int victim = -1;
      int64_t most = 0;
      uint64_t seen = 0;
      for (int v = 0; v < workers_; ++v) {
        const uint64_t r = ranges_[v].packed.load(std::memory_order_relaxed);
        if (v != w && end_of(r) - begin_of(r) > most) {
          victim = v;
          most = end_of(r) - begin_of(r);
          seen = r;
        }
      }
      if (victim < 0) return false;
      const int64_t middle = end_of(seen) - (most + 1) / 2;
      if (ranges_[victim].packed.compare_exchange_strong(seen, pack(begin_of(seen), middle),
                                                         std::memory_order_relaxed)) {
        // Nobody else writes an empty range, so a plain store hands w its new one.
        ranges_[w].packed.store(pack(middle, end_of(seen)), std::memory_order_relaxed);
        return true;
      }
    }
  }

  int workers_;
  std::unique_ptr<Slot[]> ranges_;
};

// Calls body(next) once on each thread of an at::parallel_for over the workers (one per thread); body calls
// next() for item indices in [0, items) until it returns -1, and every item is handed out exactly once.
// Per-thread scratch lives in body, outside its loop over the items.
template <typename Body>
void parallel_for_stealing(int64_t items, const Body& body) {
  if (items <= 0) return;
  const int workers = static_cast<int>(std::min<int64_t>(std::max(at::get_num_threads(), 1), items));
  StealableRanges ranges(items, workers);
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    // A thread may be handed several workers (fewer threads than asked, or a nested call on one thread): it
    // serves them in turn, the first stealing what the others' ranges hold, so the rest find nothing left.
    for (int64_t w = first; w < last; ++w) body([&ranges, w] { return ranges.next(static_cast<int>(w)); });
  });
}

}  // namespace mk
