// A CPU stand-in for the CUDA runtime, for testing the CUDA kernels' indexing and synchronisation on a
// machine without a GPU (tests/cuda_emulation/emulate.py).  Not a simulator of the hardware: a launch
// runs its blocks one after another, each block's threads as real threads that meet at __syncthreads();
// __shared__ variables are static (one block at a time uses them).  Register pressure, shared-memory
// limits, warp-synchronous code and timing are out of its reach.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <semaphore>
#include <optional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

// The device functions the kernels call unqualified.  CUDA declares float overloads of the math functions in the
// global namespace (exp of a float is a float, as std::exp's), where C's <math.h> has only the double ones.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline int64_t min(int64_t a, int64_t b) { return b < a ? b : a; }
using std::erf;
using std::exp;
using std::fmax;
using std::isinf;
using std::log;
using std::sqrt;
using std::tanh;

namespace mk_emu {

inline std::barrier<>* block_barrier = nullptr;
inline thread_local unsigned char* dynamic_shared = nullptr;  // the block's extern __shared__ array

// The real threads that run a launch's CUDA threads, kept from launch to launch: creating a block's 256 threads
// on every launch took most of the emulated tests' time.  Each waits on its own semaphore, so that a launch wakes
// only the threads it uses.
class ThreadPool {
 public:
  // Runs body(t) for every t < n, each on its own pool thread, all at once (so that they can meet at barriers);
  // returns when every one has returned.  One call at a time.
  void run(unsigned n, const std::function<void(unsigned)>& body) {
    while (workers_.size() < n) {
      auto worker = std::make_unique<Worker>();
      worker->thread = std::thread(&ThreadPool::serve, this, worker.get(), static_cast<unsigned>(workers_.size()));
      workers_.push_back(std::move(worker));
    }
    body_ = &body;
    pending_ = n;
    for (unsigned t = 0; t < n; ++t) workers_[t]->go.release();
    done_.acquire();
  }

  ~ThreadPool() {
    stop_ = true;
    for (auto& w : workers_) w->go.release();
    for (auto& w : workers_) w->thread.join();
  }

 private:
  struct Worker {
    std::binary_semaphore go{0};
    std::thread thread;
  };

  void serve(Worker* self, unsigned t) {
    for (;;) {
      self->go.acquire();
      if (stop_) return;
      (*body_)(t);
      if (pending_.fetch_sub(1) == 1) done_.release();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned)>* body_ = nullptr;
  std::atomic<unsigned> pending_{0};
  std::binary_semaphore done_{0};
  bool stop_ = false;
};

inline ThreadPool pool;

// Runs kernel(args...) on every thread of every block of `grid`, one block at a time: one real thread per
// thread of a block, reused from block to block.  __syncthreads() waits at `sync`, which a thread leaves
// when it returns from the kernel (as on the GPU, a returned thread no longer holds the others back); all
// threads then meet at `block_done`, whose completion makes a fresh `sync` for the next block.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    const unsigned threads = block.x * block.y * block.z;
    const unsigned blocks = grid.x * grid.y * grid.z;
    // Exactly smem bytes (16-byte aligned, as operator new[] gives), so that ASan sees an overrun.
    const std::unique_ptr<unsigned char[]> shared_memory(new unsigned char[smem]);
    blockDim = block;
    gridDim = grid;
    std::optional<std::barrier<>> sync(std::in_place, threads);
    block_barrier = &*sync;
    const auto next_block = [&]() noexcept {
      sync.emplace(threads);
      block_barrier = &*sync;
    };
    std::barrier<decltype(next_block)> block_done(threads, next_block);
    pool.run(threads, [&](unsigned t) {
      threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      dynamic_shared = shared_memory.get();
      for (unsigned b = 0; b < blocks; ++b) {
        blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y));
        kernel(args...);
        block_barrier->arrive_and_drop();
        block_done.arrive_and_wait();
      }
    });
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return {kernel, grid, block, smem};
}

}  // namespace mk_emu

inline void __syncthreads() { mk_emu::block_barrier->arrive_and_wait(); }
