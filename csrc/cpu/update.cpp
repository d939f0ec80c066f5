// CPU kernels of the fused update ops: the per-element math of csrc/update_math.h in contiguous inner
// loops over __restrict__ pointers that GCC vectorises (-O3 -fno-math-errno; checked with
// -fopt-info-vec), threaded with at::parallel_for (the extension is built with -fopenmp).
//
// Forward: one job per (task, chunk of kChunk parameters); each element is read once and each output
// written once.  Backward: one job per chunk; the job walks the tasks t = 0..T-1 in order, writing
// per-task cotangents row by row and summing the cotangents of [P] (task-shared) inputs in chunk-local
// double accumulators, so the reduction over tasks is deterministic and needs no atomics.
// When no lr cotangent is requested it is not computed, so SGD's and momentum's backward do not read
// the gradient or the momentum buffer at all.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "../dispatch.h"
#include "../update_kernels.h"
#include "clones.h"
#include "parallel.h"

namespace mk {
namespace {

// NOTE: 1024 elements keep a backward job's scratch (5 cotangent rows in fp32 and 5 double
// accumulators) at 60 KB, within L2, while giving ~1000 jobs at P = 1e6 for load balance.
constexpr int64_t kChunk = 1024;

template <typename scalar_t>
const scalar_t* row(const void* base, int64_t row_stride, int64_t t, int64_t offset) {
  return base == nullptr ? nullptr : static_cast<const scalar_t*>(base) + t * row_stride + offset;
}
template <typename scalar_t>
scalar_t* row(void* base, int64_t row_stride, int64_t t, int64_t offset) {
  return base == nullptr ? nullptr : static_cast<scalar_t*>(base) + t * row_stride + offset;
}

template <typename acc_t, typename scalar_t>
inline acc_t load(const scalar_t* __restrict__ x, int64_t i) {
  return static_cast<acc_t>(x[i]);
}

// One task's chunk of the forward.  Absent states are nullptr and never touched.
// NOTE: noinline (part of MK_CPU_CLONES) keeps the __restrict__ promises intact; inlined into the parallel lambda, GCC
// versioned the loop on a runtime alias check that sent Adam's forward down the scalar path
// (perf annotate: divss/sqrtss, 33 ms for 16M elements on 2 cores).
template <UpdateKind kind, bool kLrTensor, typename scalar_t>
MK_CPU_CLONES void forward_chunk(const UpdateConsts<typename AccType<scalar_t>::type> c, int64_t n, const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                   const scalar_t* __restrict__ s0, const scalar_t* __restrict__ s1,
                   const scalar_t* __restrict__ lr, scalar_t* __restrict__ po, scalar_t* __restrict__ so0,
                   scalar_t* __restrict__ so1) {
  using acc_t = typename AccType<scalar_t>::type;
  using Math = typename UpdateMathFor<kind, acc_t>::type;
  constexpr int kStates = update_num_states(kind);
  for (int64_t i = 0; i < n; ++i) {
    acc_t s[2] = {acc_t(0), acc_t(0)}, s_new[2], p_new;
    if constexpr (kStates >= 1) s[0] = load<acc_t>(s0, i);
    if constexpr (kStates >= 2) s[1] = load<acc_t>(s1, i);
    const acc_t lr_i = kLrTensor ? load<acc_t>(lr, i) : c.lr;
    Math::forward(c, lr_i, load<acc_t>(p, i), load<acc_t>(g, i), s, p_new, s_new);
    po[i] = static_cast<scalar_t>(p_new);
    if constexpr (kStates >= 1) so0[i] = static_cast<scalar_t>(s_new[0]);
    if constexpr (kStates >= 2) so1[i] = static_cast<scalar_t>(s_new[1]);
  }
}

template <UpdateKind kind, bool kLrTensor, typename scalar_t>
void forward_impl(const UpdateHyper& h, const UpdateForwardArgs& a) {
  const int64_t nchunks = (a.P + kChunk - 1) / kChunk;
  const UpdateConsts<typename AccType<scalar_t>::type> c(h);
  at::parallel_for(0, a.T * nchunks, grain_for(kChunk), [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / nchunks, c0 = (job % nchunks) * kChunk, n = std::min(kChunk, a.P - c0);
      forward_chunk<kind, kLrTensor, scalar_t>(
          c, n, row<scalar_t>(a.param, a.param_rs, t, c0), row<scalar_t>(a.grad, a.grad_rs, t, c0),
          row<scalar_t>(a.state[0], a.state_rs[0], t, c0), row<scalar_t>(a.state[1], a.state_rs[1], t, c0),
          row<scalar_t>(a.lr, a.lr_rs, t, c0), row<scalar_t>(a.param_out, a.P, t, c0),
          row<scalar_t>(a.state_out[0], a.P, t, c0), row<scalar_t>(a.state_out[1], a.P, t, c0));
    }
  });
}

// Per-element cotangents of one task's chunk in the accumulation type, or their sums over tasks in double.
template <typename acc_t>
struct ChunkCotangents {
  alignas(64) acc_t gp[kChunk];
  alignas(64) acc_t dg[kChunk];
  alignas(64) acc_t ds[2][kChunk];
  alignas(64) acc_t dlr[kChunk];
};

// One task's chunk of the backward.  gp/gs0/gs1 point at zeros when that output got no cotangent.
template <UpdateKind kind, bool kLrTensor, bool kLrGrad, typename scalar_t, typename acc_t>
MK_CPU_CLONES void backward_chunk(const UpdateConsts<acc_t> c, int64_t n, const scalar_t* __restrict__ g, const scalar_t* __restrict__ s0,
                    const scalar_t* __restrict__ s1, const scalar_t* __restrict__ lr,
                    const scalar_t* __restrict__ gp, const scalar_t* __restrict__ gs0,
                    const scalar_t* __restrict__ gs1, ChunkCotangents<acc_t>& out) {
  using Math = typename UpdateMathFor<kind, acc_t>::type;
  constexpr int kStates = update_num_states(kind);
  for (int64_t i = 0; i < n; ++i) {
    acc_t s[2] = {acc_t(0), acc_t(0)}, gs[2] = {acc_t(0), acc_t(0)}, ds[2], dg, dlr;
    if constexpr (kStates >= 1) s[0] = load<acc_t>(s0, i), gs[0] = load<acc_t>(gs0, i);
    if constexpr (kStates >= 2) s[1] = load<acc_t>(s1, i), gs[1] = load<acc_t>(gs1, i);
    const acc_t lr_i = kLrTensor ? load<acc_t>(lr, i) : c.lr;
    const acc_t gp_i = load<acc_t>(gp, i);
    Math::backward(c, lr_i, load<acc_t>(g, i), s, gp_i, gs, dg, ds, dlr);
    out.gp[i] = gp_i;
    out.dg[i] = dg;
    if constexpr (kStates >= 1) out.ds[0][i] = ds[0];
    if constexpr (kStates >= 2) out.ds[1][i] = ds[1];
    if constexpr (kLrGrad) out.dlr[i] = dlr;
  }
}

// Writes one task's chunk of a cotangent (per task) or adds it to the chunk's running sum over tasks.
template <typename scalar_t, typename acc_t>
void emit(GradMode mode, void* out, int64_t P, int64_t t, int64_t c0, int64_t n, const acc_t* __restrict__ value,
          double* __restrict__ sum) {
  if (mode == GradMode::kPerTask) {
    scalar_t* __restrict__ dst = row<scalar_t>(out, P, t, c0);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(value[i]);
  } else if (mode == GradMode::kSumOverTasks) {
    for (int64_t i = 0; i < n; ++i) sum[i] += value[i];
  }
}

// The chunk's double sums over tasks, rounded to the accumulation type, then stored.
template <typename scalar_t, typename acc_t>
void store_sum(GradMode mode, void* out, int64_t c0, int64_t n, const double* __restrict__ sum) {
  if (mode != GradMode::kSumOverTasks) return;
  scalar_t* __restrict__ dst = static_cast<scalar_t*>(out) + c0;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(static_cast<acc_t>(sum[i]));
}

template <UpdateKind kind, bool kLrTensor, bool kLrGrad, typename scalar_t>
void backward_impl(const UpdateHyper& h, const UpdateBackwardArgs& a) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr int kStates = update_num_states(kind);
  const int64_t nchunks = (a.P + kChunk - 1) / kChunk;
  const UpdateConsts<acc_t> c(h);
  at::parallel_for(0, nchunks, grain_for(kChunk * a.T), [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t zeros[kChunk];
    std::fill(zeros, zeros + kChunk, scalar_t(0));
    ChunkCotangents<acc_t> cot;
    ChunkCotangents<double> sums;  // gp -> d_param, dg -> d_grad, ds -> d_state, dlr -> d_lr
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t c0 = chunk * kChunk, n = std::min(kChunk, a.P - c0);
      const auto zero_if_summed = [n](GradMode mode, double* sum) {
        if (mode == GradMode::kSumOverTasks) std::fill(sum, sum + n, 0.0);
      };
      zero_if_summed(a.d_param_mode, sums.gp);
      zero_if_summed(a.d_grad_mode, sums.dg);
      for (int k = 0; k < kStates; ++k) zero_if_summed(a.d_state_mode[k], sums.ds[k]);
      if constexpr (kLrGrad) zero_if_summed(a.d_lr_mode, sums.dlr);
      for (int64_t t = 0; t < a.T; ++t) {
        const auto cotangent_row = [&](const void* base) {
          return base ? row<scalar_t>(base, a.P, t, c0) : static_cast<const scalar_t*>(zeros);
        };
        backward_chunk<kind, kLrTensor, kLrGrad, scalar_t, acc_t>(
            c, n, row<scalar_t>(a.grad, a.grad_rs, t, c0), row<scalar_t>(a.state[0], a.state_rs[0], t, c0),
            row<scalar_t>(a.state[1], a.state_rs[1], t, c0), row<scalar_t>(a.lr, a.lr_rs, t, c0),
            cotangent_row(a.grad_param_out), cotangent_row(a.grad_state_out[0]),
            cotangent_row(a.grad_state_out[1]), cot);
        emit<scalar_t>(a.d_param_mode, a.d_param, a.P, t, c0, n, cot.gp, sums.gp);
        emit<scalar_t>(a.d_grad_mode, a.d_grad, a.P, t, c0, n, cot.dg, sums.dg);
        for (int k = 0; k < kStates; ++k) emit<scalar_t>(a.d_state_mode[k], a.d_state[k], a.P, t, c0, n, cot.ds[k], sums.ds[k]);
        if constexpr (kLrGrad) emit<scalar_t>(a.d_lr_mode, a.d_lr, a.P, t, c0, n, cot.dlr, sums.dlr);
      }
      store_sum<scalar_t, acc_t>(a.d_param_mode, a.d_param, c0, n, sums.gp);
      store_sum<scalar_t, acc_t>(a.d_grad_mode, a.d_grad, c0, n, sums.dg);
      for (int k = 0; k < kStates; ++k) store_sum<scalar_t, acc_t>(a.d_state_mode[k], a.d_state[k], c0, n, sums.ds[k]);
      if constexpr (kLrGrad) store_sum<scalar_t, acc_t>(a.d_lr_mode, a.d_lr, c0, n, sums.dlr);
    }
  });
}

}  // namespace

void update_forward_cpu(UpdateKind kind, DType dtype, const UpdateHyper& hyper, const UpdateForwardArgs& a) {
  with_update_kind(kind, [&](auto k) {
    with_bool(a.lr != nullptr, [&](auto lr_tensor) {
      with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto tag) {
        forward_impl<decltype(k)::value, decltype(lr_tensor)::value, decltype(tag)>(hyper, a);
      });
    });
  });
}

void update_backward_cpu(UpdateKind kind, DType dtype, const UpdateHyper& hyper, const UpdateBackwardArgs& a) {
  with_update_kind(kind, [&](auto k) {
    with_bool(a.lr != nullptr, [&](auto lr_tensor) {
      with_bool(a.d_lr_mode != GradMode::kNone, [&](auto lr_grad) {
        with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto tag) {
          backward_impl<decltype(k)::value, decltype(lr_tensor)::value, decltype(lr_grad)::value, decltype(tag)>(hyper, a);
        });
      });
    });
  });
}

}  // namespace mk
