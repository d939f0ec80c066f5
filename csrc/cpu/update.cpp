// CPU kernels of the fused update ops: the per-element math of csrc/update_math.h in contiguous inner
// loops that GCC vectorises (-O3 -fno-math-errno; checked with -fopt-info-vec), threaded with
// at::parallel_for.
//
// Forward: one job per (task, chunk of kChunk parameters); each element is read once and each output
// written once.  Backward: one job per chunk; the job walks the tasks t = 0..T-1 in order, writing
// per-task cotangents row by row and summing the cotangents of [P] (task-shared) inputs in fp32/fp64
// chunk-local accumulators, so the reduction over tasks is deterministic and needs no atomics.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "../dispatch.h"
#include "../update_kernels.h"

namespace mk {
namespace {

// NOTE: 1024 elements keep a backward job's scratch (4 cotangent rows + 5 accumulators, fp32) at
// 36 KB, within L2, while giving ~1000 jobs at P = 1e6 for load balance.
constexpr int64_t kChunk = 1024;
// Elements per thread below which at::parallel_for stays on one thread (ATen's own GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

template <typename scalar_t>
const scalar_t* row(const void* base, int64_t row_stride, int64_t t, int64_t offset) {
  return static_cast<const scalar_t*>(base) + t * row_stride + offset;
}
template <typename scalar_t>
scalar_t* row(void* base, int64_t row_stride, int64_t t, int64_t offset) {
  return static_cast<scalar_t*>(base) + t * row_stride + offset;
}

template <UpdateKind kind, bool kLrTensor, typename scalar_t>
void forward_impl(const UpdateHyper& h, const UpdateForwardArgs& a) {
  using acc_t = typename AccType<scalar_t>::type;
  using Math = typename UpdateMathFor<kind, acc_t>::type;
  constexpr int kStates = update_num_states(kind);
  const int64_t nchunks = (a.P + kChunk - 1) / kChunk;
  const acc_t lr_scalar = static_cast<acc_t>(h.lr);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / kChunk);
  at::parallel_for(0, a.T * nchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / nchunks, c0 = (job % nchunks) * kChunk, n = std::min(kChunk, a.P - c0);
      const scalar_t* p = row<scalar_t>(a.param, a.param_rs, t, c0);
      const scalar_t* g = row<scalar_t>(a.grad, a.grad_rs, t, c0);
      const scalar_t* lr = kLrTensor ? row<scalar_t>(a.lr, a.lr_rs, t, c0) : nullptr;
      const scalar_t* s[2] = {nullptr, nullptr};
      scalar_t* so[2] = {nullptr, nullptr};
      for (int k = 0; k < kStates; ++k) {
        s[k] = row<scalar_t>(a.state[k], a.state_rs[k], t, c0);
        so[k] = row<scalar_t>(a.state_out[k], a.P, t, c0);
      }
      scalar_t* po = row<scalar_t>(a.param_out, a.P, t, c0);
      for (int64_t i = 0; i < n; ++i) {
        acc_t si[2] = {acc_t(0), acc_t(0)}, so_i[2], p_new;
        for (int k = 0; k < kStates; ++k) si[k] = static_cast<acc_t>(s[k][i]);
        const acc_t lr_i = kLrTensor ? static_cast<acc_t>(lr[i]) : lr_scalar;
        Math::forward(h, lr_i, static_cast<acc_t>(p[i]), static_cast<acc_t>(g[i]), si, p_new, so_i);
        po[i] = static_cast<scalar_t>(p_new);
        for (int k = 0; k < kStates; ++k) so[k][i] = static_cast<scalar_t>(so_i[k]);
      }
    }
  });
}

// Writes one task's chunk of a cotangent (per task) or adds it to the chunk's running sum over tasks.
template <typename scalar_t, typename acc_t>
void emit(GradMode mode, void* out, int64_t P, int64_t t, int64_t c0, int64_t n, const acc_t* value,
          acc_t* sum) {
  if (mode == GradMode::kPerTask) {
    scalar_t* dst = row<scalar_t>(out, P, t, c0);
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(value[i]);
  } else if (mode == GradMode::kSumOverTasks) {
    for (int64_t i = 0; i < n; ++i) sum[i] += value[i];
  }
}

template <typename scalar_t, typename acc_t>
void store_sum(GradMode mode, void* out, int64_t c0, int64_t n, const acc_t* sum) {
  if (mode != GradMode::kSumOverTasks) return;
  scalar_t* dst = static_cast<scalar_t*>(out) + c0;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(sum[i]);
}

template <UpdateKind kind, bool kLrTensor, typename scalar_t>
void backward_impl(const UpdateHyper& h, const UpdateBackwardArgs& a) {
  using acc_t = typename AccType<scalar_t>::type;
  using Math = typename UpdateMathFor<kind, acc_t>::type;
  constexpr int kStates = update_num_states(kind);
  const int64_t nchunks = (a.P + kChunk - 1) / kChunk;
  const acc_t lr_scalar = static_cast<acc_t>(h.lr);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / (kChunk * std::max<int64_t>(a.T, 1)));
  at::parallel_for(0, nchunks, grain, [&](int64_t begin, int64_t end) {
    // Missing output cotangents read as zeros from this row.
    alignas(64) scalar_t zeros[kChunk];
    std::fill(zeros, zeros + kChunk, scalar_t(0));
    alignas(64) acc_t dg[kChunk], ds[2][kChunk], dlr[kChunk], gp_acc[kChunk];
    alignas(64) acc_t sum_p[kChunk], sum_g[kChunk], sum_s[2][kChunk], sum_lr[kChunk];
    for (int64_t c = begin; c < end; ++c) {
      const int64_t c0 = c * kChunk, n = std::min(kChunk, a.P - c0);
      std::fill(sum_p, sum_p + n, acc_t(0));
      std::fill(sum_g, sum_g + n, acc_t(0));
      std::fill(sum_s[0], sum_s[0] + n, acc_t(0));
      std::fill(sum_s[1], sum_s[1] + n, acc_t(0));
      std::fill(sum_lr, sum_lr + n, acc_t(0));
      for (int64_t t = 0; t < a.T; ++t) {
        const scalar_t* g = row<scalar_t>(a.grad, a.grad_rs, t, c0);
        const scalar_t* lr = kLrTensor ? row<scalar_t>(a.lr, a.lr_rs, t, c0) : nullptr;
        const scalar_t* gp = a.grad_param_out ? row<scalar_t>(a.grad_param_out, a.P, t, c0) : zeros;
        const scalar_t* s[2] = {zeros, zeros};
        const scalar_t* gs[2] = {zeros, zeros};
        for (int k = 0; k < kStates; ++k) {
          s[k] = row<scalar_t>(a.state[k], a.state_rs[k], t, c0);
          if (a.grad_state_out[k]) gs[k] = row<scalar_t>(a.grad_state_out[k], a.P, t, c0);
        }
        for (int64_t i = 0; i < n; ++i) {
          acc_t si[2] = {static_cast<acc_t>(s[0][i]), static_cast<acc_t>(s[1][i])};
          acc_t gsi[2] = {static_cast<acc_t>(gs[0][i]), static_cast<acc_t>(gs[1][i])};
          acc_t dsi[2] = {acc_t(0), acc_t(0)};
          const acc_t lr_i = kLrTensor ? static_cast<acc_t>(lr[i]) : lr_scalar;
          const acc_t gp_i = static_cast<acc_t>(gp[i]);
          Math::backward(h, lr_i, static_cast<acc_t>(g[i]), si, gp_i, gsi, dg[i], dsi, dlr[i]);
          ds[0][i] = dsi[0];
          ds[1][i] = dsi[1];
          gp_acc[i] = gp_i;
        }
        emit<scalar_t>(a.d_param_mode, a.d_param, a.P, t, c0, n, gp_acc, sum_p);
        emit<scalar_t>(a.d_grad_mode, a.d_grad, a.P, t, c0, n, dg, sum_g);
        for (int k = 0; k < kStates; ++k) emit<scalar_t>(a.d_state_mode[k], a.d_state[k], a.P, t, c0, n, ds[k], sum_s[k]);
        emit<scalar_t>(a.d_lr_mode, a.d_lr, a.P, t, c0, n, dlr, sum_lr);
      }
      store_sum<scalar_t>(a.d_param_mode, a.d_param, c0, n, sum_p);
      store_sum<scalar_t>(a.d_grad_mode, a.d_grad, c0, n, sum_g);
      for (int k = 0; k < kStates; ++k) store_sum<scalar_t>(a.d_state_mode[k], a.d_state[k], c0, n, sum_s[k]);
      store_sum<scalar_t>(a.d_lr_mode, a.d_lr, c0, n, sum_lr);
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
      with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto tag) {
        backward_impl<decltype(k)::value, decltype(lr_tensor)::value, decltype(tag)>(hyper, a);
      });
    });
  });
}

}  // namespace mk
