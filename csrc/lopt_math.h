// Math of the fused learned-optimizer step (metakernels.ops.learned_update), shared by the C++ CPU loop
// and the CUDA kernel.  Functions work on L "lanes" (L parameters at once, lane-minor arrays
// x[k * L + l]): the CPU instantiates a wide L so that GCC vectorises over the lanes, CUDA uses L = 1
// (one parameter per thread).  Everything is templated on the accumulation type acc_t.
//
// Per parameter element (task t, index i inside parameter tensor `seg`):
//   state s = (m_1, m_2, m_3, v):   m_j' = b_j m_j + (1 - b_j) g,   v' = b_v v + (1 - b_v) g^2
//   r = 1 / sqrt(v' + eps_v)
//   features f = (p, g, m_1', m_2', m_3', g r, m_1' r, m_2' r, m_3' r)                  (F = 9)
//   normalised x_k = f_k * n[t, seg, k],   n = 1 / sqrt(mean over seg of f_k^2 + eps_n)
//   MLP: a_1 = relu(W_1 x + b_1), a_{l+1} = relu(W_{l+1} a_l + b_{l+1}), (d, q) = W_o a_L + b_o
//   p' = p - step_mult * d * exp(exp_mult * q)
//
// Flat weight vector layout (acc_t): W_1 [H, F], b_1 [H], then for each further hidden layer
// W [H, H], b [H], then W_o [2, H], b_o [2].
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "update_math.h"

#if defined(__CUDACC__)
// One element per thread (CUDA): loops whose trip count the compiler knows (the MLP's shape fixed at
// compile time) unroll fully, so that the per-thread arrays they index stay in registers; loops of
// unknown count are left as they are.
#define MK_UNROLL _Pragma("unroll")
#define MK_SIMD MK_UNROLL
#else
// Every loop over lanes is vectorised over the lanes by OpenMP SIMD.  NOTE: without the pragma GCC
// vectorised lopt_dense along k instead (gathers with stride L): 5.5 GFLOP/s at hidden=32.
#define MK_UNROLL
#define MK_SIMD _Pragma("omp simd")
#endif

// Always inlined, so that the CPU's AVX2/FMA clone of each job function compiles them for its target
// (NOTE: left to GCC, lopt_mlp_forward stayed a separate baseline-SSE function: 4.4 GFLOP/s).
// The lambdas inside them too (MK_LAMBDA_INLINE after the parameter list): GCC may otherwise emit a lambda
// as its own baseline function (at hidden=32 it did for em_outer's tiles: the backward ran 5x slower).
#if defined(__CUDACC__)
#define MK_LANES_INLINE __forceinline__
#define MK_LAMBDA_INLINE
#else
#define MK_LANES_INLINE inline __attribute__((always_inline))
#define MK_LAMBDA_INLINE __attribute__((always_inline))
#endif

namespace mk {

constexpr int kLoptFeatures = 9;
constexpr int kLoptMomenta = 3;
constexpr int kLoptStates = 4;  // m_1, m_2, m_3, v
constexpr int kLoptMaxHidden = 256;
constexpr int kLoptMaxLayers = 4;

// Fixed hyper-parameters of one call (host side, double).
struct LoptHyper {
  double beta[kLoptMomenta];
  double beta_v;
  double eps_v;
  double eps_n;
  double step_mult;
  double exp_mult;
};

template <typename acc_t>
struct LoptConsts {
  acc_t beta[kLoptMomenta], beta_v, eps_v, eps_n, step_mult, exp_mult;
  MK_HOST_DEVICE explicit LoptConsts(const LoptHyper& h)
      : beta_v(static_cast<acc_t>(h.beta_v)),
        eps_v(static_cast<acc_t>(h.eps_v)),
        eps_n(static_cast<acc_t>(h.eps_n)),
        step_mult(static_cast<acc_t>(h.step_mult)),
        exp_mult(static_cast<acc_t>(h.exp_mult)) {
    for (int j = 0; j < kLoptMomenta; ++j) beta[j] = static_cast<acc_t>(h.beta[j]);
  }
};

// Number of MLP weights (the flat layout above).
MK_HOST_DEVICE inline int64_t lopt_num_weights(int H, int layers) {
  return static_cast<int64_t>(H) * kLoptFeatures + H + static_cast<int64_t>(layers - 1) * (H * H + H) + 2 * H + 2;
}

// Offset of hidden layer `layer`'s matrix in the flat weights (its bias follows the matrix).
MK_HOST_DEVICE inline int64_t lopt_layer_offset(int H, int layer) {
  return layer == 0 ? 0 : static_cast<int64_t>(H) * kLoptFeatures + H + static_cast<int64_t>(layer - 1) * (H * H + H);
}

// T in a non-deduced context (so that nullptr can be passed for an optional acc_t* argument).
template <typename T>
struct NonDeduced {
  using type = T;
};

#if !defined(__CUDACC__)
// A VB-byte vector of acc_t (GCC vector extension) that may alias acc_t arrays at any alignment.  The CPU
// lanes code runs with 256-bit vectors (VB = 32) in its AVX2 and baseline clones and with 512-bit ones
// (VB = 64) in its AVX-512 instance (csrc/cpu/lopt.cpp).  NOTE: 512-bit types compiled for AVX2 ran 40x
// slower (GCC splits them through memory), hence a width per instruction set, not one for all.
template <typename acc_t, int VB>
struct LaneVec {
  typedef acc_t type __attribute__((vector_size(VB), aligned(alignof(acc_t)), may_alias));
};
#endif

template <typename acc_t>
MK_HOST_DEVICE inline acc_t lopt_rsqrt(acc_t x) {
  return acc_t(1) / std::sqrt(x);
}

// New state s_new[k * L + l] and raw features f[k * L + l] of L elements.
template <int L, typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_features(const LoptConsts<acc_t>& c, const acc_t* p, const acc_t* g,
                                         const acc_t* s, acc_t* s_new, acc_t* f) {
  MK_SIMD
  for (int l = 0; l < L; ++l) {
    const acc_t gl = g[l];
    for (int j = 0; j < kLoptMomenta; ++j) s_new[j * L + l] = c.beta[j] * s[j * L + l] + (acc_t(1) - c.beta[j]) * gl;
    s_new[3 * L + l] = c.beta_v * s[3 * L + l] + (acc_t(1) - c.beta_v) * gl * gl;
    const acc_t r = lopt_rsqrt(s_new[3 * L + l] + c.eps_v);
    f[0 * L + l] = p[l];
    f[1 * L + l] = gl;
    f[5 * L + l] = gl * r;
    for (int j = 0; j < kLoptMomenta; ++j) {
      f[(2 + j) * L + l] = s_new[j * L + l];
      f[(6 + j) * L + l] = s_new[j * L + l] * r;
    }
  }
}

// Backward of lopt_features: given df (cotangent of the raw features) and ds_new (cotangent of the
// new state, may be nullptr), writes dp = df_p, dg, and ds (cotangent of the old state).
template <int L, typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_features_backward(const LoptConsts<acc_t>& c, const acc_t* g, const acc_t* s_new,
                                                  const acc_t* df, const typename NonDeduced<acc_t>::type* ds_new, acc_t* dp, acc_t* dg,
                                                  acc_t* ds) {
  MK_SIMD
  for (int l = 0; l < L; ++l) {
    const acc_t gl = g[l];
    const acc_t r = lopt_rsqrt(s_new[3 * L + l] + c.eps_v);
    acc_t dr = df[5 * L + l] * gl;
    acc_t dgl = df[1 * L + l] + df[5 * L + l] * r;
    for (int j = 0; j < kLoptMomenta; ++j) {
      const acc_t dm = (ds_new ? ds_new[j * L + l] : acc_t(0)) + df[(2 + j) * L + l] + df[(6 + j) * L + l] * r;
      dr += df[(6 + j) * L + l] * s_new[j * L + l];
      dgl += dm * (acc_t(1) - c.beta[j]);
      ds[j * L + l] = dm * c.beta[j];
    }
    const acc_t dv = (ds_new ? ds_new[3 * L + l] : acc_t(0)) - acc_t(0.5) * dr * r * r * r;
    dgl += dv * (acc_t(1) - c.beta_v) * acc_t(2) * gl;
    ds[3 * L + l] = dv * c.beta_v;
    dp[l] = df[0 * L + l];
    dg[l] = dgl;
  }
}

// Without mask: relu, x[i] = max(x[i], 0) with NaN kept NaN (as torch.relu).  With mask: the relu
// derivative's mask, x[i] = 0 where mask[i] > 0 is false (as torch's threshold_backward).
template <typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_relu(acc_t* x, const acc_t* mask, int64_t n) {
  MK_SIMD
  for (int64_t i = 0; i < n; ++i) x[i] = (mask ? mask[i] > acc_t(0) : !(x[i] <= acc_t(0))) ? x[i] : acc_t(0);
}

// What lopt_lanes_matvec applies to each output before storing it (see lopt_relu).
enum LoptEpilogue { kLoptLinear, kLoptRelu, kLoptReluMask };

#if !defined(__CUDACC__)
// Stores one vector of lopt_lanes_matvec's output after its epilogue, applied in registers (NOTE: a separate pass over
// the output was ~9% of the forward's samples at hidden=32), and returns the vector stored.
template <LoptEpilogue kEpilogue, typename V>
MK_LANES_INLINE V lopt_store(V* out, V v, const V* mask, int64_t at) {
  if constexpr (kEpilogue == kLoptRelu) v = v <= V{} ? V{} : v;  // NaN kept: NaN <= 0 is false
  if constexpr (kEpilogue == kLoptReluMask) v = mask[at] > V{} ? v : V{};
  out[at] = v;
  return v;
}
#endif

// out[r][l] = bias[r] (0 when bias is nullptr) + sum_c A[r * rs + c * cs] in[c][l], for r < rows,
// c < cols: a dense layer on L lanes (rs = n_in, cs = 1) or its transpose (rs = 1, cs = n_in); then
// kLoptRelu: relu(out), kLoptReluMask: out times the relu mask of mask[r][l] (lopt_relu's two forms).
template <int L, int VB = 32, LoptEpilogue kEpilogue = kLoptLinear, typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_lanes_matvec(const acc_t* A, int64_t rs, int64_t cs, int rows, int cols,
                                                      const acc_t* bias, const acc_t* in, acc_t* out,
                                                      const acc_t* mask = nullptr) {
#if !defined(__CUDACC__)
  if constexpr (L * sizeof(acc_t) % VB == 0) {
    // NOTE: GCC keeps a local acc[L] array in memory (a load and a store per FMA, 37 GFLOP/s at
    // hidden=32); vector-typed accumulators for a block of rows stay in registers and share the loads
    // of `in`.  kRows * R = kAcc independent accumulators cover the FMA latency: 8 of the 16 AVX2
    // registers, 16 of the 32 AVX-512 ones (with 512-bit vectors, 4 ran the forward at 0.6x the speed
    // of 8; 16 gained another ~3% over 8).
    using V = typename LaneVec<acc_t, VB>::type;
    constexpr int R = static_cast<int>(L * sizeof(acc_t) / VB);
    constexpr int kAcc = VB == 64 ? 16 : 8;
    constexpr int kRows = R >= kAcc ? 1 : kAcc / R;
    const V* vin = reinterpret_cast<const V*>(in);
    V* vout = reinterpret_cast<V*>(out);
    const V* vmask = reinterpret_cast<const V*>(mask);
    int r = 0;
    for (; r + kRows <= rows; r += kRows) {
      V a[kRows][R];
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) a[i][j] = V{} + (bias ? bias[r + i] : acc_t(0));
      for (int c = 0; c < cols; ++c) {
        acc_t w[kRows];
#pragma GCC unroll 16
        for (int i = 0; i < kRows; ++i) w[i] = A[(r + i) * rs + c * cs];
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) {
          const V x = vin[c * R + j];
#pragma GCC unroll 16
          for (int i = 0; i < kRows; ++i) a[i][j] += w[i] * x;
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) lopt_store<kEpilogue>(vout, a[i][j], vmask, (r + i) * R + j);
    }
    // The rows left over (the output layer's two, the first layer's transpose's ninth): one row at a time
    // with kRows partial sums over interleaved columns, as many independent accumulators again.  NOTE:
    // with one sum per row, the output layer alone was a 4 * H-cycle dependency chain per block.
    for (; r < rows; ++r) {
      V a[kRows][R];
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) a[i][j] = V{} + (i == 0 && bias ? bias[r] : acc_t(0));
      int c = 0;
      for (; c + kRows <= cols; c += kRows)
#pragma GCC unroll 16
        for (int i = 0; i < kRows; ++i) {
          const acc_t w = A[r * rs + (c + i) * cs];
#pragma GCC unroll 16
          for (int j = 0; j < R; ++j) a[i][j] += w * vin[(c + i) * R + j];
        }
      for (; c < cols; ++c) {
        const acc_t w = A[r * rs + c * cs];
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) a[0][j] += w * vin[c * R + j];
      }
#pragma GCC unroll 16
      for (int i = 1; i < kRows; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) a[0][j] += a[i][j];
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) lopt_store<kEpilogue>(vout, a[0][j], vmask, r * R + j);
    }
    return;
  }
#endif
  MK_UNROLL
  for (int r = 0; r < rows; ++r) {
    acc_t acc[L];
    for (int l = 0; l < L; ++l) acc[l] = bias ? bias[r] : acc_t(0);
    MK_UNROLL
    for (int c = 0; c < cols; ++c) {
      const acc_t w = A[r * rs + c * cs];
      for (int l = 0; l < L; ++l) acc[l] += w * in[c * L + l];
    }
    for (int l = 0; l < L; ++l) out[r * L + l] = acc[l];
  }
  if (kEpilogue != kLoptLinear) lopt_relu(out, kEpilogue == kLoptReluMask ? mask : nullptr, static_cast<int64_t>(rows) * L);
}

#if !defined(__CUDACC__)
// Lanes of one VB-byte vector of acc_t: the width of the CPU weight gradient's partial sums.
template <typename acc_t, int VB>
constexpr int kLoptVecLanes = static_cast<int>(VB / sizeof(acc_t));

// One tile of lopt_lanes_outer: the partials of rows [r0, r0 + TR) x columns [c0, c0 + TC) (kBias: of the
// biases of rows [r0, r0 + TR), as a column of ones), TR * TC independent accumulators.
template <int L, int VB, int TR, int TC, bool kBias, typename acc_t>
inline __attribute__((always_inline)) void lopt_lanes_outer_tile(const acc_t* dz, int64_t dz_stride, const acc_t* in,
                                                                 int64_t in_stride, int nb, int rows, int cols, int r0,
                                                                 int c0, acc_t* dW_lanes) {
  using V = typename LaneVec<acc_t, VB>::type;
  constexpr int R = static_cast<int>(L * sizeof(acc_t) / VB);
  V* acc = reinterpret_cast<V*>(dW_lanes);
  const auto slot = [&](int i, int k) MK_LAMBDA_INLINE -> V& {
    return kBias ? acc[static_cast<int64_t>(rows) * cols + r0 + i] : acc[static_cast<int64_t>(r0 + i) * cols + c0 + k];
  };
  V s[TR][TC];
#pragma GCC unroll 16
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 16
    for (int k = 0; k < TC; ++k) s[i][k] = slot(i, k);
  for (int b = 0; b < nb; ++b) {
    const V* d = reinterpret_cast<const V*>(dz + b * dz_stride) + r0 * R;
    const V* x = reinterpret_cast<const V*>(in + b * in_stride) + c0 * R;
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j)
#pragma GCC unroll 16
      for (int i = 0; i < TR; ++i) {
        const V di = d[i * R + j];
#pragma GCC unroll 16
        for (int k = 0; k < TC; ++k) s[i][k] += kBias ? di : di * x[k * R + j];
      }
  }
#pragma GCC unroll 16
  for (int i = 0; i < TR; ++i)
#pragma GCC unroll 16
    for (int k = 0; k < TC; ++k) slot(i, k) = s[i][k];
}

// The weight gradient of one dense layer over nb blocks of L lanes, kept as vector-wide partial sums that
// the caller reduces once per job: dW[r * cols + c] += sum_b sum_l dz_b[r][l] in_b[c][l], then
// db[r] += sum_b sum_l dz_b[r][l] (db after dW), where block b's arrays start at dz + b * dz_stride and
// in + b * in_stride, and every weight q holds kLoptVecLanes partials at dW_lanes[q * kLoptVecLanes + i].
// NOTE: the first version reduced each weight's lanes to one double per block of L lanes: that
// horizontal sum cost ~7x the block's 4 FMAs per weight (backward 6x the forward at hidden=32).  With one
// block per call (nb = 1), every partial (92 KB at hidden=32, in L2) was loaded and stored for only
// L / kLoptVecLanes FMAs; the weight gradient took ~70 of the 195 ms of forward + backward at P = 1e6
// (one thread).  nb = 4 and register tiles: ~10% less forward + backward; nb = 8 no better.
template <int L, int VB, typename acc_t>
inline __attribute__((always_inline)) void lopt_lanes_outer(const acc_t* dz, int64_t dz_stride, const acc_t* in,
                                                            int64_t in_stride, int nb, int rows, int cols,
                                                            acc_t* dW_lanes) {
  static_assert(L * sizeof(acc_t) % VB == 0, "lanes must fill whole vectors");
  // 2 x 8 tiles where the columns come in eights (1 x 8 with the 16 AVX2 registers): 16 independent
  // accumulators cover the FMA latency.  The other columns and the biases: 8 x 1 tiles down the rows.
  constexpr int kTileRows = VB == 64 ? 2 : 1, kTileCols = 8, kThinRows = 8;
  const int wide_cols = cols - cols % kTileCols;
  const auto tile = [&](auto tr, auto tc, auto bias, int r0, int c0) MK_LAMBDA_INLINE {
    lopt_lanes_outer_tile<L, VB, decltype(tr)::value, decltype(tc)::value, decltype(bias)::value>(
        dz, dz_stride, in, in_stride, nb, rows, cols, r0, c0, dW_lanes);
  };
  using One = std::integral_constant<int, 1>;
  using No = std::false_type;
  int r = 0;
  for (; r + kTileRows <= rows; r += kTileRows)
    for (int c = 0; c < wide_cols; c += kTileCols)
      tile(std::integral_constant<int, kTileRows>{}, std::integral_constant<int, kTileCols>{}, No{}, r, c);
  for (; r < rows; ++r)
    for (int c = 0; c < wide_cols; c += kTileCols) tile(One{}, std::integral_constant<int, kTileCols>{}, No{}, r, c);
  const auto thin = [&](auto bias, int c) MK_LAMBDA_INLINE {
    int r = 0;
    for (; r + kThinRows <= rows; r += kThinRows) tile(std::integral_constant<int, kThinRows>{}, One{}, bias, r, c);
    for (; r < rows; ++r) tile(One{}, One{}, bias, r, c);
  };
  for (int c = wide_cols; c < cols; ++c) thin(No{}, c);
  thin(std::true_type{}, 0);
}
#endif

// One dense layer on L lanes: out[h * L + l] = act(sum_k W[h, k] in[k * L + l] + b[h]).
template <int L, bool kRelu, int VB = 32, typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_dense(const acc_t* W, const acc_t* b, int n_in, int n_out, const acc_t* in, acc_t* out) {
  lopt_lanes_matvec<L, VB, kRelu ? kLoptRelu : kLoptLinear>(W, n_in, 1, n_out, n_in, b, in, out);
}

// MLP forward: x [F][L] -> activations act [layers][H][L] (kept for the backward), out [2][L].
template <int L, int VB = 32, typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_mlp_forward(const acc_t* w, int H, int layers, const acc_t* x, acc_t* act, acc_t* out) {
  const acc_t* in = x;
  int n_in = kLoptFeatures;
  MK_UNROLL
  for (int layer = 0; layer < layers; ++layer) {
    const acc_t* W = w + lopt_layer_offset(H, layer);
    lopt_dense<L, true, VB>(W, W + static_cast<int64_t>(H) * n_in, n_in, H, in, act + static_cast<int64_t>(layer) * H * L);
    in = act + static_cast<int64_t>(layer) * H * L;
    n_in = H;
  }
  const acc_t* Wo = w + lopt_layer_offset(H, layers);
  lopt_dense<L, false, VB>(Wo, Wo + 2 * H, H, 2, in, out);
}

// The step: p' = p - step, step = step_mult * d * exp(exp_mult * q).
template <typename acc_t>
MK_HOST_DEVICE inline acc_t lopt_step(const LoptConsts<acc_t>& c, acc_t d, acc_t q) {
  return c.step_mult * d * std::exp(c.exp_mult * q);
}

// din[k][l] = sum_h W[h, k] dz[h][l] (times the relu mask of `in` when kReluIn): the input cotangent of
// one dense layer on L lanes.
template <int L, bool kReluIn, int VB = 32, typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_dense_backward(const acc_t* W, int n_in, int n_out, const acc_t* in, const acc_t* dz,
                                               acc_t* din) {
  lopt_lanes_matvec<L, VB, kReluIn ? kLoptReluMask : kLoptLinear>(W, 1, n_in, n_in, n_out, static_cast<const acc_t*>(nullptr),
                                                                 dz, din, in);
}

// MLP backward on L lanes: from dout [2][L] (cotangent of (d, q)) to dx [F][L], keeping every hidden
// layer's pre-activation cotangent in dz [layers][H][L] for the weight gradient.
template <int L, int VB = 32, typename acc_t>
MK_HOST_DEVICE MK_LANES_INLINE void lopt_mlp_backward(const acc_t* w, int H, int layers, const acc_t* x, const acc_t* act,
                                                      const acc_t* dout, acc_t* dz, acc_t* dx) {
  const int64_t HL = static_cast<int64_t>(H) * L;
  lopt_dense_backward<L, true, VB>(w + lopt_layer_offset(H, layers), H, 2, act + (layers - 1) * HL, dout,
                                   dz + (layers - 1) * HL);
  for (int layer = layers - 1; layer >= 1; --layer)
    lopt_dense_backward<L, true, VB>(w + lopt_layer_offset(H, layer), H, H, act + (layer - 1) * HL, dz + layer * HL,
                                     dz + (layer - 1) * HL);
  lopt_dense_backward<L, false, VB>(w, kLoptFeatures, H, x, dz, dx);
}

#if !defined(__CUDACC__)
// The MLP's weight gradient over nb blocks of L lanes (CPU), accumulated into dw_lanes (the partial sums
// of lopt_lanes_outer, flat weight layout).  Block b has x at x + b * x_stride [F][L], act at
// act + b * act_stride [layers][H][L], and dz at dz + b * dz_stride: [layers][H][L] then dout [2][L].
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void lopt_mlp_weight_grad(int H, int layers, int nb, const acc_t* x, int64_t x_stride, const acc_t* act,
                                          int64_t act_stride, const acc_t* dz, int64_t dz_stride, acc_t* dw_lanes) {
  const int64_t HL = static_cast<int64_t>(H) * L;
  const auto at = [dw_lanes](int64_t offset) { return dw_lanes + offset * kLoptVecLanes<acc_t, VB>; };
  lopt_lanes_outer<L, VB>(dz + layers * HL, dz_stride, act + (layers - 1) * HL, act_stride, nb, 2, H,
                          at(lopt_layer_offset(H, layers)));
  for (int layer = layers - 1; layer >= 1; --layer)
    lopt_lanes_outer<L, VB>(dz + layer * HL, dz_stride, act + (layer - 1) * HL, act_stride, nb, H, H,
                            at(lopt_layer_offset(H, layer)));
  lopt_lanes_outer<L, VB>(dz, dz_stride, x, x_stride, nb, H, kLoptFeatures, at(0));
}
#endif

}  // namespace mk
