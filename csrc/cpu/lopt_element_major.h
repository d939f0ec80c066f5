// The learned optimizer's MLP on one block of L elements with element-major activations (CPU backward,
// hidden sizes that fill whole vectors): a[e * H + h] for element e < L and unit h < H.
//
// Why: the lanes layout of csrc/lopt_math.h (a[h * L + e]) vectorises over elements, so its weight
// gradient dW[r][c] = sum_e dz[r][e] a[c][e] keeps one vector of partial sums per weight in memory (92 KB
// at hidden=32, beyond L1) and reloads it for every few FMAs: ~0.65x the rate of the matvecs.  Element-major,
// dW[r][c:c+VL] += dz(e, r) a[e][c:c+VL] is a rank-1 update whose register tile stays put over every element
// of a job, and each layer becomes out[e][o:o+VL] += in(e, k) M[k][o:o+VL]: the input is broadcast one scalar
// at a time, so it may come in either layout.
//
// Every function works on VB-byte vectors of acc_t (VL = VB / sizeof(acc_t) lanes); output widths O are
// multiples of VL.  Register tiles are kTile elements (or rows) x 2 vectors: 16 accumulators of the 32
// AVX-512 registers, 8 of the 16 AVX2 ones (enough to cover the FMA latency).
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../lopt_math.h"
#include "aligned_buffer.h"

namespace mk {

template <typename acc_t, int VB>
struct EmVec {
  using V = typename LaneVec<acc_t, VB>::type;
  using Index = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
  typedef Index IV __attribute__((vector_size(VB)));
  static constexpr int VL = VB / static_cast<int>(sizeof(acc_t));
  static constexpr int kTile = VB == 64 ? 8 : 4;
  static MK_LANES_INLINE V load(const acc_t* p) { return *reinterpret_cast<const V*>(p); }
};

// The sum of the N vectors v[0..N), as a tree of pairwise additions (log2(N) deep, not N - 1).
template <typename acc_t, int VB, int N>
MK_LANES_INLINE typename EmVec<acc_t, VB>::V em_tree_sum(const typename EmVec<acc_t, VB>::V* v) {
  if constexpr (N == 1) return v[0];
  else return em_tree_sum<acc_t, VB, N / 2>(v) + em_tree_sum<acc_t, VB, N - N / 2>(v + N / 2);
}

// out[e * O + o] = epilogue(bias[o] + sum_{k < K} in[e * es + k * ks] M[k * O + o]) for e < L, o < O
// (bias may be nullptr; kLoptReluMask reads the mask at mask[e * O + o]).  A dense layer is M = W^T; the input
// cotangent of a dense layer is M = W itself (k the layer's output, o its input).
template <int L, int VB, LoptEpilogue kEpilogue, typename acc_t>
MK_LANES_INLINE void em_dense(const acc_t* in, int64_t es, int64_t ks, int K, const acc_t* M, int O,
                              const acc_t* bias, acc_t* out, const acc_t* mask = nullptr) {
  using E = EmVec<acc_t, VB>;
  using V = typename E::V;
  constexpr int VL = E::VL, kE = E::kTile;
  static_assert(L % kE == 0, "a block holds whole tiles");
  const auto tile = [&](auto vectors, int e0, int o0) MK_LAMBDA_INLINE {
    constexpr int TV = decltype(vectors)::value;
    V a[kE][TV];
#pragma GCC unroll 16
    for (int i = 0; i < kE; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < TV; ++j) a[i][j] = bias ? E::load(bias + o0 + j * VL) : V{};
    // NOTE: one pointer per operand stepped along k, so that with constant strides every element's input
    // is a constant offset from it (indexed from `in`, GCC kept one offset per element, spilled to the stack).
    const acc_t* xk = in + e0 * es;
    const acc_t* mk = M + o0;
    for (int k = 0; k < K; ++k, xk += ks, mk += O) {
      V m[TV];
#pragma GCC unroll 16
      for (int j = 0; j < TV; ++j) m[j] = E::load(mk + j * VL);
#pragma GCC unroll 16
      for (int i = 0; i < kE; ++i) {
        const acc_t x = xk[i * es];
#pragma GCC unroll 16
        for (int j = 0; j < TV; ++j) a[i][j] += x * m[j];
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < kE; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < TV; ++j)
        lopt_store<kEpilogue>(reinterpret_cast<V*>(out), a[i][j], reinterpret_cast<const V*>(mask),
                              (static_cast<int64_t>(e0 + i) * O + o0) / VL + j);
  };
  const int pairs_end = O / (2 * VL) * (2 * VL);  // the columns in tiles of two vectors
  for (int o0 = 0; o0 < pairs_end; o0 += 2 * VL)
    for (int e0 = 0; e0 < L; e0 += kE) tile(std::integral_constant<int, 2>{}, e0, o0);
  if (pairs_end < O)
    for (int e0 = 0; e0 < L; e0 += kE) tile(std::integral_constant<int, 1>{}, e0, pairs_end);
}

// Lane j of the result of em_fold_all holds the sum of input vector em_fold_order()[j].
template <int VL>
constexpr std::array<int, VL> em_fold_order() {
  std::array<std::array<int, VL>, VL> id{};  // id[v][lane]: which input vector's sum the lane carries
  for (int v = 0; v < VL; ++v)
    for (int l = 0; l < VL; ++l) id[v][l] = v;
  int n = VL;
  for (int G = VL; G > 1; G /= 2, n /= 2)
    for (int m = 0; m < n / 2; ++m) {
      std::array<int, VL> z{};
      for (int l = 0; l < VL; ++l) {
        const int p = l / G, i = l % G;
        z[l] = i < G / 2 ? id[2 * m][p * G + i] : id[2 * m + 1][p * G + i - G / 2];
      }
      id[m] = z;
    }
  return id[0];
}

// Shuffle mask of one fold of group size G: lanes [pG, pG + G/2) from x's group p, [pG + G/2, pG + G) from
// y's group p, each starting at offset `half` (0 or G/2) within the group.
template <typename IV, typename Index, int VL, int G, int kHalf, size_t... I>
constexpr IV em_fold_mask(std::index_sequence<I...>) {
  return IV{static_cast<Index>(
      (static_cast<int>(I) % G) < G / 2 ? (static_cast<int>(I) / G) * G + static_cast<int>(I) % G + kHalf
                                        : VL + (static_cast<int>(I) / G) * G + static_cast<int>(I) % G - G / 2 + kHalf)...};
}

// The horizontal sums of VL vectors at once: lane j of the result is the sum of the lanes of v[order[j]]
// (em_fold_order).  log2(VL) levels that each add two shuffles of a pair: VL - 1 additions in all, instead
// of a shuffle-and-add chain per vector.
template <typename acc_t, int VB, int G = EmVec<acc_t, VB>::VL>
MK_LANES_INLINE typename EmVec<acc_t, VB>::V em_fold_all(typename EmVec<acc_t, VB>::V* v) {
  using E = EmVec<acc_t, VB>;
  constexpr int VL = E::VL;
  if constexpr (G == 1) {
    return v[0];
  } else {
    using IV = typename E::IV;
    constexpr IV lo = em_fold_mask<IV, typename E::Index, VL, G, 0>(std::make_index_sequence<VL>{});
    constexpr IV hi = em_fold_mask<IV, typename E::Index, VL, G, G / 2>(std::make_index_sequence<VL>{});
    constexpr int n = G;  // vectors at this level, each holding VL / G groups of G lanes
#pragma GCC unroll 16
    for (int m = 0; m < n / 2; ++m)
      v[m] = __builtin_shuffle(v[2 * m], v[2 * m + 1], lo) + __builtin_shuffle(v[2 * m], v[2 * m + 1], hi);
    return em_fold_all<acc_t, VB, G / 2>(v);
  }
}

// Shuffle mask of one stage of em_transpose_stages: rows a = r[i] and b = r[i + D] (bit D of i clear) swap
// their off-diagonal D x D blocks; kHigh selects the new r[i + D], else the new r[i].
template <typename IV, typename Index, int VL, int D, bool kHigh, size_t... J>
constexpr IV em_swap_mask(std::index_sequence<J...>) {
  return IV{static_cast<Index>(
      kHigh ? ((static_cast<int>(J) & D) == 0 ? static_cast<int>(J) + D : VL + static_cast<int>(J))
            : ((static_cast<int>(J) & D) == 0 ? static_cast<int>(J) : VL + static_cast<int>(J) - D))...};
}

// Transposes the VL x VL block r[i][j] in registers: the stage for bit D swaps bit D of the row and column
// indices, r[i][j] <-> r[i + D][j - D] where bit D of i is clear and bit D of j is set (VL shuffles), and the
// stages for every bit of the index, D = VL / 2 .. 1, make r[i][j] <- r[j][i].
template <typename acc_t, int VB, int D = EmVec<acc_t, VB>::VL / 2>
MK_LANES_INLINE void em_transpose_stages(typename EmVec<acc_t, VB>::V* r) {
  if constexpr (D >= 1) {
    using E = EmVec<acc_t, VB>;
    using V = typename E::V;
    constexpr int VL = E::VL;
    constexpr typename E::IV lo =
        em_swap_mask<typename E::IV, typename E::Index, VL, D, false>(std::make_index_sequence<VL>{});
    constexpr typename E::IV hi =
        em_swap_mask<typename E::IV, typename E::Index, VL, D, true>(std::make_index_sequence<VL>{});
#pragma GCC unroll 16
    for (int i = 0; i < VL; ++i)
      if ((i & D) == 0) {
        const V a = r[i], b = r[i + D];
        r[i] = __builtin_shuffle(a, b, lo);
        r[i + D] = __builtin_shuffle(a, b, hi);
      }
    em_transpose_stages<acc_t, VB, D / 2>(r);
  }
}

// out[c * L + e] = in[e * C + c] for e < L, c < C (C a multiple of VL): element-major to lanes, one VL x VL
// block at a time (em_transpose_stages); also sums[c] += sum_e in[e * C + c], from the block's rows before
// they are transposed (the first layer's bias gradient: VL - 1 additions a block, where em_column_sums read
// dz again).
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_to_lanes(const acc_t* in, int C, acc_t* out, acc_t* sums) {
  using E = EmVec<acc_t, VB>;
  using V = typename E::V;
  constexpr int VL = E::VL;
  static_assert(L % VL == 0, "a block holds whole vectors");
  for (int e0 = 0; e0 < L; e0 += VL)
    for (int c0 = 0; c0 < C; c0 += VL) {
      V r[VL];
#pragma GCC unroll 16
      for (int i = 0; i < VL; ++i) r[i] = E::load(in + static_cast<int64_t>(e0 + i) * C + c0);
      *reinterpret_cast<V*>(sums + c0) += em_tree_sum<acc_t, VB, VL>(r);
      em_transpose_stages<acc_t, VB>(r);
#pragma GCC unroll 16
      for (int j = 0; j < VL; ++j) *reinterpret_cast<V*>(out + static_cast<int64_t>(c0 + j) * L + e0) = r[j];
    }
}

// The output layer from element-major activations to lanes: out[k * L + e] = b[k] + sum_h Wo[k * H + h] a[e * H + h],
// k < 2.
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_output_layer(const acc_t* Wo, const acc_t* bo, int H, const acc_t* a, acc_t* out) {
  using E = EmVec<acc_t, VB>;
  using V = typename E::V;
  constexpr int VL = E::VL;
  constexpr std::array<int, VL> order = em_fold_order<VL>();
  for (int k = 0; k < 2; ++k)
    for (int e0 = 0; e0 < L; e0 += VL) {
      V v[VL];
#pragma GCC unroll 16
      for (int t = 0; t < VL; ++t) {
        v[t] = V{};
        for (int h = 0; h < H; h += VL) v[t] += E::load(a + static_cast<int64_t>(e0 + t) * H + h) * E::load(Wo + k * H + h);
      }
      const V sums = em_fold_all<acc_t, VB>(v);
#pragma GCC unroll 16
      for (int j = 0; j < VL; ++j) out[k * L + e0 + order[j]] = bo[k] + sums[j];
    }
}

// The output layer's backward on one block: from dout [2][L] (lanes) and the last hidden layer's activations
// a [L][H] (element-major), its pre-activation cotangent dz[e * H + h] = relu'(a[e * H + h]) sum_{k < 2}
// Wo[k * H + h] dout[k * L + e], and the output layer's weight gradient, dWo[k * H + h] += sum_e dout[k * L + e]
// a[e * H + h], dbo[k] += sum_e dout[k * L + e] (dWo and dbo consecutive, as in the flat layout); also the last
// hidden layer's bias gradient db[h] += sum_e dz[e * H + h] where db is not nullptr.  NOTE: as an em_dense with
// K = 2 and an em_outer with two rows, each read a again, and the two took 4.9% of the hidden=32 backward's
// samples for 3% of its multiply-adds; one pass over a serves both.
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_output_backward(const acc_t* dout, const acc_t* Wo, int H, const acc_t* a, acc_t* dz,
                                        acc_t* dWo, acc_t* db) {
  using E = EmVec<acc_t, VB>;
  using V = typename E::V;
  constexpr int VL = E::VL, kE = E::kTile;
  static_assert(L % kE == 0, "a block holds whole groups of interleaved elements");
  for (int o = 0; o < H; o += VL) {
    const V w0 = E::load(Wo + o), w1 = E::load(Wo + H + o);
    V g0[kE], g1[kE], z[kE];  // the gradients' partial sums over interleaved elements (the FMA latency)
#pragma GCC unroll 16
    for (int u = 0; u < kE; ++u) g0[u] = g1[u] = z[u] = V{};
    for (int e0 = 0; e0 < L; e0 += kE)
#pragma GCC unroll 16
      for (int u = 0; u < kE; ++u) {
        const int64_t at = (static_cast<int64_t>(e0 + u) * H + o) / VL;
        const V x = reinterpret_cast<const V*>(a)[at];
        const acc_t d0 = dout[e0 + u], d1 = dout[L + e0 + u];
        z[u] += lopt_store<kLoptReluMask>(reinterpret_cast<V*>(dz), d0 * w0 + d1 * w1, reinterpret_cast<const V*>(a),
                                          at);
        g0[u] += d0 * x;
        g1[u] += d1 * x;
      }
    *reinterpret_cast<V*>(dWo + o) += em_tree_sum<acc_t, VB, kE>(g0);
    *reinterpret_cast<V*>(dWo + H + o) += em_tree_sum<acc_t, VB, kE>(g1);
    if (db) *reinterpret_cast<V*>(db + o) += em_tree_sum<acc_t, VB, kE>(z);
  }
  for (int k = 0; k < 2; ++k) {
    V sums = V{};  // NOTE: summed one element at a time, a chain of L dependent additions (0.8% of the samples)
    for (int e = 0; e < L; e += VL) sums += E::load(dout + k * L + e);
    acc_t sum = 0;
#pragma GCC unroll 16
    for (int l = 0; l < VL; ++l) sum += sums[l];
    dWo[2 * H + k] += sum;
  }
}

// The rank-1 updates of a weight gradient over nb blocks: acc[i * O + o] += sum_b sum_{e < L} P_b(e, i) Q_b[e * O + o]
// for i < rows, o < O, where P_b(e, i) = P[b * p_stride + e * p_es + i * p_is] and Q_b = Q + b * q_stride.  The
// tile's accumulators are loaded once and stored once per call.
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_outer(const acc_t* P, int64_t p_stride, int64_t p_es, int64_t p_is, int rows, const acc_t* Q,
                              int64_t q_stride, int O, int nb, acc_t* acc) {
  using E = EmVec<acc_t, VB>;
  using V = typename E::V;
  constexpr int VL = E::VL, kE = E::kTile;
  const auto tile = [&](auto vectors, int r0, int o0) MK_LAMBDA_INLINE {
    constexpr int TR = kE, TV = decltype(vectors)::value;
    V s[TR][TV];
    V* at = reinterpret_cast<V*>(acc);
#pragma GCC unroll 16
    for (int i = 0; i < TR; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < TV; ++j) s[i][j] = at[(static_cast<int64_t>(r0 + i) * O + o0) / VL + j];
    for (int b = 0; b < nb; ++b) {
      const acc_t* p = P + b * p_stride + r0 * p_is;  // stepped along e as em_dense's operands along k
      const acc_t* q = Q + b * q_stride + o0;
      for (int e = 0; e < L; ++e, p += p_es, q += O) {
        V x[TV];
#pragma GCC unroll 16
        for (int j = 0; j < TV; ++j) x[j] = E::load(q + j * VL);
#pragma GCC unroll 16
        for (int i = 0; i < TR; ++i) {
          const acc_t w = p[i * p_is];
#pragma GCC unroll 16
          for (int j = 0; j < TV; ++j) s[i][j] += w * x[j];
        }
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TR; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < TV; ++j) at[(static_cast<int64_t>(r0 + i) * O + o0) / VL + j] = s[i][j];
  };
  using Two = std::integral_constant<int, 2>;
  using One = std::integral_constant<int, 1>;
  static_assert(L % kE == 0, "a block holds whole groups of interleaved elements");
  // NOTE: loop bounds computed up front, so that with constant sizes the compiler sees the leftover loops
  // empty (carried over from the tiled loops, it warned of a signed overflow in them).
  const int tiles_end = rows / kE * kE, pairs_end = O / (2 * VL) * (2 * VL);
  // A row left over from the tiles (the first layer's ninth feature): kE partial sums over interleaved
  // elements, as many independent accumulators as a tile has.  NOTE: as a one-row tile, each such row was one
  // chain of nb * L dependent FMAs: the output layer's two rows (em_output_backward's since) took 4.7% of the
  // hidden=32 backward's samples for 1.5% of its multiply-adds, the first layer's weight gradient 6.8 -> 5.7%.
  const auto row = [&](auto vectors, int r, int o0) MK_LAMBDA_INLINE {
    constexpr int TV = decltype(vectors)::value;
    V s[kE][TV];
#pragma GCC unroll 16
    for (int u = 0; u < kE; ++u)
#pragma GCC unroll 16
      for (int j = 0; j < TV; ++j) s[u][j] = V{};
    for (int b = 0; b < nb; ++b) {
      const acc_t* p = P + b * p_stride + r * p_is;
      const acc_t* q = Q + b * q_stride + o0;
      for (int e = 0; e < L; e += kE, p += kE * p_es, q += kE * O)
#pragma GCC unroll 16
        for (int u = 0; u < kE; ++u) {
          const acc_t w = p[u * p_es];
#pragma GCC unroll 16
          for (int j = 0; j < TV; ++j) s[u][j] += w * E::load(q + u * O + j * VL);
        }
    }
    V* at = reinterpret_cast<V*>(acc);
#pragma GCC unroll 16
    for (int j = 0; j < TV; ++j) {
      V sum = s[0][j];
#pragma GCC unroll 16
      for (int u = 1; u < kE; ++u) sum += s[u][j];
      at[(static_cast<int64_t>(r) * O + o0) / VL + j] += sum;
    }
  };
  const auto column = [&](auto vectors, int o) MK_LAMBDA_INLINE {
    for (int r = 0; r < tiles_end; r += kE) tile(vectors, r, o);
    for (int r = tiles_end; r < rows; ++r) row(vectors, r, o);
  };
  for (int o0 = 0; o0 < pairs_end; o0 += 2 * VL) column(Two{}, o0);
  if (pairs_end < O) column(One{}, pairs_end);
}

// A bias gradient over nb blocks: acc[o] += sum_b sum_{e < L} Q[b * q_stride + e * O + o], o < O.
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_column_sums(const acc_t* Q, int64_t q_stride, int O, int nb, acc_t* acc) {
  using E = EmVec<acc_t, VB>;
  using V = typename E::V;
  static_assert(L % 4 == 0, "four partial sums");
  for (int o = 0; o < O; o += E::VL) {
    V s[4] = {};  // four partial sums over elements (the add latency)
    for (int b = 0; b < nb; ++b)
      for (int e = 0; e < L; e += 4)
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) s[u] += E::load(Q + b * q_stride + static_cast<int64_t>(e + u) * O + o);
    *reinterpret_cast<V*>(acc + o) += (s[0] + s[1]) + (s[2] + s[3]);
  }
}

// Where hidden layer `layer`'s bias sits in the flat weight layout: after its H x n_in weights (or, for the first
// layer, after its weight gradient stored transposed, which has as many entries).
inline int64_t em_bias_offset(int H, int layer) {
  return lopt_layer_offset(H, layer) + static_cast<int64_t>(H) * (layer == 0 ? kLoptFeatures : H);
}

// The MLP weights rearranged for em_dense, built once per call: each hidden layer's W^T ([n_in][H]).
template <typename acc_t>
class EmWeights {
 public:
  EmWeights(const acc_t* w, int H, int layers)
      : H_(H), packed_(static_cast<size_t>(offset(layers))) {
    for (int layer = 0; layer < layers; ++layer) {
      const int n_in = layer == 0 ? kLoptFeatures : H;
      const acc_t* W = w + lopt_layer_offset(H, layer);
      acc_t* WT = packed_.data() + offset(layer);
      for (int r = 0; r < H; ++r)
        for (int c = 0; c < n_in; ++c) WT[static_cast<int64_t>(c) * H + r] = W[static_cast<int64_t>(r) * n_in + c];
    }
  }
  const acc_t* transposed(int layer) const { return packed_.data() + offset(layer); }

 private:
  int64_t offset(int layer) const {
    return layer == 0 ? 0 : static_cast<int64_t>(H_) * kLoptFeatures + static_cast<int64_t>(layer - 1) * H_ * H_;
  }
  int H_;
  AlignedVector<acc_t> packed_;
};

// MLP forward (the math of lopt_mlp_forward): x [F][L] (lanes) -> act [layers][L][H] (element-major), out [2][L].
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_mlp_forward(const acc_t* w, const EmWeights<acc_t>& packed, int H, int layers, const acc_t* x,
                                    acc_t* act, acc_t* out) {
  const int64_t HL = static_cast<int64_t>(H) * L;
  // The first layer reads x in lanes, the others element-major activations: two calls, so that each has
  // constant strides.
  em_dense<L, VB, kLoptRelu>(x, 1, L, kLoptFeatures, packed.transposed(0), H, w + static_cast<int64_t>(H) * kLoptFeatures,
                             act);
  for (int layer = 1; layer < layers; ++layer)
    em_dense<L, VB, kLoptRelu>(act + (layer - 1) * HL, H, 1, H, packed.transposed(layer), H,
                               w + lopt_layer_offset(H, layer) + static_cast<int64_t>(H) * H, act + layer * HL);
  const acc_t* Wo = w + lopt_layer_offset(H, layers);
  em_output_layer<L, VB>(Wo, Wo + 2 * H, H, act + (layers - 1) * HL, out);
}

// MLP backward (the math of lopt_mlp_backward): dout [2][L] -> the pre-activation cotangents dz [layers][L][H]
// (element-major) and dx [F][L] (lanes), through dz_lanes [H][L], the first layer's dz in lanes; also adds to dw
// the output layer's weight gradient and the bias gradients of the first and the last hidden layer, which come
// from passes this makes over dz anyway (em_output_backward, em_to_lanes; the rest come from em_mlp_weight_grad).
// NOTE: dx from the element-major dz, out[e][k] = sum_h dz[e][h] W_1[h][k], had F = 9 outputs padded to 16 and
// a scalar transpose to lanes after (14% of the hidden=32 backward's samples for 7% of its multiply-adds); the
// transposed dz feeds the lanes matvec, 9 rows without padding, whose output is dx in lanes.
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_mlp_backward(const acc_t* w, int H, int layers, const acc_t* act, const acc_t* dout, acc_t* dz,
                                     acc_t* dz_lanes, acc_t* dx, acc_t* dw) {
  const int64_t HL = static_cast<int64_t>(H) * L;
  acc_t* last_bias = layers > 1 ? dw + em_bias_offset(H, layers - 1) : nullptr;  // else em_to_lanes sums it
  em_output_backward<L, VB>(dout, w + lopt_layer_offset(H, layers), H, act + (layers - 1) * HL, dz + (layers - 1) * HL,
                            dw + lopt_layer_offset(H, layers), last_bias);
  for (int layer = layers - 1; layer >= 1; --layer)
    em_dense<L, VB, kLoptReluMask>(dz + layer * HL, H, 1, H, w + lopt_layer_offset(H, layer), H,
                                   static_cast<const acc_t*>(nullptr), dz + (layer - 1) * HL, act + (layer - 1) * HL);
  em_to_lanes<L, VB>(dz, H, dz_lanes, dw + em_bias_offset(H, 0));
  lopt_dense_backward<L, false, VB>(w, kLoptFeatures, H, static_cast<const acc_t*>(nullptr), dz_lanes, dx);
}

// The hidden layers' weight gradient over nb blocks, accumulated into dw (acc_t, the flat weight layout except
// W_1's gradient, stored transposed as [F][H]: see em_add_weight_grad; the output layer's and the first and last
// hidden layers' bias gradients come from em_mlp_backward).  Block b has x at x + b * x_stride [F][L], act at
// act + b * act_stride [layers][L][H], and dz at dz + b * dz_stride [layers][L][H].
template <int L, int VB, typename acc_t>
MK_LANES_INLINE void em_mlp_weight_grad(int H, int layers, int nb, const acc_t* x, int64_t x_stride, const acc_t* act,
                                        int64_t act_stride, const acc_t* dz, int64_t dz_stride, acc_t* dw) {
  const int64_t HL = static_cast<int64_t>(H) * L;
  for (int layer = layers - 1; layer >= 1; --layer) {
    acc_t* dW = dw + lopt_layer_offset(H, layer);
    em_outer<L, VB>(dz + layer * HL, dz_stride, H, 1, H, act + (layer - 1) * HL, act_stride, H, nb, dW);
    if (layer < layers - 1) em_column_sums<L, VB>(dz + layer * HL, dz_stride, H, nb, dw + em_bias_offset(H, layer));
  }
  em_outer<L, VB>(x, x_stride, 1, L, kLoptFeatures, dz, dz_stride, H, nb, dw);
}

// total[q] += dw[q] over the nw weights of the flat layout, un-transposing W_1's gradient (em_mlp_weight_grad).
template <typename acc_t>
inline void em_add_weight_grad(const acc_t* dw, int H, int64_t nw, double* total) {
  for (int r = 0; r < H; ++r)
    for (int c = 0; c < kLoptFeatures; ++c) total[r * kLoptFeatures + c] += static_cast<double>(dw[c * H + r]);
  for (int64_t q = static_cast<int64_t>(H) * kLoptFeatures; q < nw; ++q) total[q] += static_cast<double>(dw[q]);
}

}  // namespace mk
