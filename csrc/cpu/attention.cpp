// CPU kernels of the fused causal attention core (csrc/attention_kernels.h): one job per (sequence, head)
// block (at::parallel_for), its operands copied once into per-thread buffers in the accumulation type.
//
// The S x S matrices of a block are kept transposed, [key j][query i]: the softmax's maximum and sums over
// the keys of each query are then element-wise across the buffer's rows, vectorised over the queries,
// instead of horizontal reductions per query (the separate softmax kernel's forward spends most of its
// time in those on 32-key rows), and key j's row only spans its visible queries i >= j; entries i < j
// hold 0.  Products are register-blocked (accumulate_rows); q, k, v, do and the cotangents are read from
// their fused rows and the results written into theirs, so no head split or merge is copied in between.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <utility>
#include <vector>

#include "../attention_kernels.h"
#include "../dispatch.h"
#include "clones.h"
#include "parallel.h"
#include "vector_math.h"

namespace mk {
namespace {

// The products' register blocks: kBlockRows rows of kTile values (two 256-bit vectors: 16 floats, 8 doubles).
constexpr int64_t kBlockRows = 4;
constexpr int kTileVectors = 2;
template <typename acc_t>
constexpr int64_t kTile = kTileVectors * 32 / static_cast<int64_t>(sizeof(acc_t));

// Per-thread scratch: slices of one buffer, handed out in order and all returned at the end of a block.
template <typename acc_t>
class Scratch {
 public:
  // Room for the largest pass, the double backward: 7 [S, d] operands, 3 transposed ones, 6 [S, S]
  // matrices, one [S, d] result and 2 vectors of S.
  Scratch(int64_t S, int64_t d) : buffer_(11 * S * d + 6 * S * S + 2 * S) {}
  acc_t* take(int64_t n) {
    if (used_ + n > static_cast<int64_t>(buffer_.size())) throw std::logic_error("attention scratch overflow");
    acc_t* p = buffer_.data() + used_;
    used_ += n;
    return p;
  }
  void reset() { used_ = 0; }

 private:
  std::vector<acc_t> buffer_;
  int64_t used_ = 0;
};

// 256-bit vectors of acc_t in GCC's vector extension, for the accumulators of the products: arrays of them
// with constant indices stay in registers across the loop that feeds them.  NOTE: with plain arrays and
// `omp simd` loops GCC kept the accumulators on the stack (a load and a store per vector and step: 1.5 ms
// for the [256, 32, 32] forward, against 0.9 ms for the composition of products and softmax).
template <typename acc_t>
struct Simd {
  typedef acc_t vec __attribute__((vector_size(32)));
  typedef acc_t unaligned __attribute__((vector_size(32), aligned(alignof(acc_t)), may_alias));
  static constexpr int64_t kLanes = 32 / sizeof(acc_t);
  static vec load(const acc_t* p) { return *reinterpret_cast<const unaligned*>(p); }
  static void store(acc_t* p, vec v) { *reinterpret_cast<unaligned*>(p) = v; }
};

// dst[i][c] = src[i * stride + c] for S rows of d features.
template <typename scalar_t, typename acc_t>
MK_CPU_INLINE void load_rows(const scalar_t* src, int64_t stride, int64_t S, int64_t d, acc_t* dst) {
  for (int64_t i = 0; i < S; ++i)
    for (int64_t c = 0; c < d; ++c) dst[i * d + c] = static_cast<acc_t>(src[i * stride + c]);
}

// dst[i * stride + c] = src[i][c] for S rows of d features.
template <typename acc_t, typename scalar_t>
MK_CPU_INLINE void store_rows(const acc_t* src, int64_t S, int64_t d, scalar_t* dst, int64_t stride) {
  for (int64_t i = 0; i < S; ++i)
    for (int64_t c = 0; c < d; ++c) dst[i * stride + c] = static_cast<scalar_t>(src[i * d + c]);
}

// dst[c][i] = src[i][c] for an [S, d] operand.
template <typename acc_t>
MK_CPU_INLINE void transpose(const acc_t* src, int64_t S, int64_t d, acc_t* dst) {
  for (int64_t i = 0; i < S; ++i)
    for (int64_t c = 0; c < d; ++c) dst[c * S + i] = src[i * d + c];
}

// mT[j][i] = m[i][j] for an [S, S] block of P, G or dZ stored [query, key], and back.
template <typename scalar_t, typename acc_t>
MK_CPU_INLINE void load_transposed(const scalar_t* m, int64_t S, acc_t* mT) {
  for (int64_t i = 0; i < S; ++i)
    for (int64_t j = 0; j < S; ++j) mT[j * S + i] = static_cast<acc_t>(m[i * S + j]);
}
template <typename acc_t, typename scalar_t>
MK_CPU_INLINE void store_transposed(const acc_t* mT, int64_t S, scalar_t* m) {
  for (int64_t i = 0; i < S; ++i)
    for (int64_t j = 0; j < S; ++j) m[i * S + j] = static_cast<scalar_t>(mT[j * S + i]);
}

// out[r * out_stride + l] (+)= sum over k in [k0, k1) of w(r, k) x(k)[l], for the kRows rows r and the
// `width` <= kTile values l of one tile (add: onto out, else over it): kRows x kTile accumulators kept in
// registers while each x(k) tile is loaded once for all rows; a narrower tail tile runs scalar loops.
template <int kRows, typename acc_t, typename Weight, typename Row>
MK_CPU_INLINE void accumulate_rows(int64_t k0, int64_t k1, int64_t width, Weight w, Row x, acc_t* __restrict__ out,
                                   int64_t out_stride, bool add) {
  using V = Simd<acc_t>;
  if (width == kTile<acc_t>) {
    typename V::vec acc[kRows][kTileVectors] = {};
    for (int64_t k = k0; k < k1; ++k) {
      const acc_t* xk = x(k);
      typename V::vec xv[kTileVectors];
#pragma GCC unroll 4
      for (int t = 0; t < kTileVectors; ++t) xv[t] = V::load(xk + t * V::kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const acc_t wr = w(r, k);
#pragma GCC unroll 4
        for (int t = 0; t < kTileVectors; ++t) acc[r][t] += wr * xv[t];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < kTileVectors; ++t) {
        acc_t* o = out + r * out_stride + t * V::kLanes;
        V::store(o, add ? acc[r][t] + V::load(o) : acc[r][t]);
      }
    return;
  }
  for (int r = 0; r < kRows; ++r) {
    acc_t* o = out + r * out_stride;
    if (!add) std::fill(o, o + width, acc_t(0));
    for (int64_t k = k0; k < k1; ++k) {
      const acc_t wr = w(r, k);
      const acc_t* xk = x(k);
      for (int64_t l = 0; l < width; ++l) o[l] += wr * xk[l];
    }
  }
}

// accumulate_rows over `rows` <= kBlockRows rows: the full block at once, a partial one row by row.
template <typename acc_t, typename Weight, typename Row>
MK_CPU_INLINE void accumulate_block(int64_t rows, int64_t k0, int64_t k1, int64_t width, Weight w, Row x, acc_t* out,
                                    int64_t out_stride, bool add) {
  if (rows == kBlockRows) return accumulate_rows<kBlockRows>(k0, k1, width, w, x, out, out_stride, add);
  for (int64_t r = 0; r < rows; ++r)
    accumulate_rows<1>(k0, k1, width, [&](int64_t, int64_t k) { return w(r, k); }, x, out + r * out_stride,
                       out_stride, add);
}

// outT[j][i] (+)= sum_c x[j][c] yT[c][i] for the queries i >= j that key j is visible to (add: onto outT);
// without add, 0 for i < j.  kBlockRows keys at a time, over the query tiles from the one holding the
// block's first key (the entries i < j that this computes are zeroed again).
template <typename acc_t>
MK_CPU_INLINE void causal_products(const acc_t* __restrict__ x, const acc_t* __restrict__ yT, int64_t S, int64_t d,
                                   acc_t* __restrict__ outT, bool add) {
  for (int64_t j0 = 0; j0 < S; j0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, S - j0), first = j0 / kTile<acc_t> * kTile<acc_t>;
    for (int64_t i0 = first; i0 < S; i0 += kTile<acc_t>)
      accumulate_block(rows, 0, d, std::min(kTile<acc_t>, S - i0), [&](int64_t r, int64_t c) { return x[(j0 + r) * d + c]; },
                       [&](int64_t c) { return yT + c * S + i0; }, outT + j0 * S + i0, S, add);
    for (int64_t j = j0; j < j0 + rows; ++j) std::fill(outT + j * S + (add ? first : 0), outT + j * S + j, acc_t(0));
  }
}

// out[i] = sum_{j <= i} aT[j][i] bT[j][i]: a per-query sum over its keys of a product of two S x S blocks.
template <typename acc_t>
MK_CPU_INLINE void query_sums(const acc_t* __restrict__ aT, const acc_t* __restrict__ bT, int64_t S,
                              acc_t* __restrict__ out) {
  std::fill(out, out + S, acc_t(0));
  for (int64_t j = 0; j < S; ++j) {
#pragma omp simd
    for (int64_t i = j; i < S; ++i) out[i] += aT[j * S + i] * bT[j * S + i];
  }
}

// In place on scaled scores sT[j][i] (0 for i < j): sT <- P^T, P_i = softmax over the keys j <= i.
template <typename acc_t>
MK_CPU_INLINE void causal_softmax_columns(acc_t* sT, int64_t S, acc_t* max, acc_t* z) {
  std::fill(max, max + S, -std::numeric_limits<acc_t>::infinity());
  std::fill(z, z + S, acc_t(0));
  for (int64_t j = 0; j < S; ++j) {
    const acc_t* row = sT + j * S;
#pragma omp simd
    for (int64_t i = j; i < S; ++i) max[i] = std::max(max[i], row[i]);
  }
  for (int64_t j = 0; j < S; ++j) {
    acc_t* row = sT + j * S;
#pragma omp simd
    for (int64_t i = j; i < S; ++i) {
      row[i] = std::exp(row[i] - max[i]);
      z[i] += row[i];
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < S; ++i) z[i] = acc_t(1) / z[i];
  for (int64_t j = 0; j < S; ++j) {
    acc_t* row = sT + j * S;
#pragma omp simd
    for (int64_t i = j; i < S; ++i) row[i] *= z[i];
  }
}

// The per-query softmax backward on transposed blocks: outT[j][i] = scale pT (gT - c_i), c_i = <P_i, G_i>
// (0 for i < j).  `c` receives c.
template <typename acc_t>
MK_CPU_INLINE void softmax_backward_columns(const acc_t* pT, const acc_t* gT, int64_t S, acc_t scale, acc_t* c,
                                            acc_t* outT) {
  query_sums(pT, gT, S, c);
  for (int64_t j = 0; j < S; ++j) {
    std::fill(outT + j * S, outT + j * S + j, acc_t(0));
#pragma omp simd
    for (int64_t i = j; i < S; ++i) outT[j * S + i] = scale * pT[j * S + i] * (gT[j * S + i] - c[i]);
  }
}

// out[row][c] (+)= sum_k w(row, k) x[k][c] for every row < S, feature c < d, k over keys(first row, rows)
// (a [k0, k1) range holding every k that any of the block's rows weights; the other weights in it are the
// causal zeros of the S x S blocks): the attention's products of an S x S block with an [S, d] operand.
template <typename acc_t, typename Keys, typename Weight>
MK_CPU_INLINE void weighted_sums(const acc_t* __restrict__ x, int64_t S, int64_t d, Keys keys, Weight w,
                                 acc_t* __restrict__ out, bool add) {
  for (int64_t r0 = 0; r0 < S; r0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, S - r0);
    const auto [k0, k1] = keys(r0, rows);
    for (int64_t c0 = 0; c0 < d; c0 += kTile<acc_t>)
      accumulate_block(rows, k0, k1, std::min(kTile<acc_t>, d - c0), [&](int64_t r, int64_t k) { return w(r0 + r, k); },
                       [&](int64_t k) { return x + k * d + c0; }, out + r0 * d + c0, d, add);
  }
}

// out[i][c] (+)= sum_{j <= i} wT[j][i] x[j][c]: each query's weighted sum over its keys.
template <typename acc_t>
MK_CPU_INLINE void sum_over_keys(const acc_t* wT, const acc_t* x, int64_t S, int64_t d, acc_t* out, bool add) {
  weighted_sums(x, S, d, [](int64_t i0, int64_t rows) { return std::pair<int64_t, int64_t>(0, i0 + rows); },
                [&](int64_t i, int64_t j) { return wT[j * S + i]; }, out, add);
}

// out[j][c] (+)= sum_{i >= j} wT[j][i] x[i][c]: each key's weighted sum over the queries it reaches.
template <typename acc_t>
MK_CPU_INLINE void sum_over_queries(const acc_t* wT, const acc_t* x, int64_t S, int64_t d, acc_t* out, bool add) {
  weighted_sums(x, S, d, [&](int64_t j0, int64_t) { return std::pair<int64_t, int64_t>(j0, S); },
                [&](int64_t j, int64_t i) { return wT[j * S + i]; }, out, add);
}

// Offsets of one (sequence, head) block in the [M, S, 3 D] fused, [M, S, D] merged and [M, H, S, S] tensors.
struct Block {
  int64_t m, h, S, d, D;
  Block(const AttentionArgs& a, int64_t block) : m(block / a.H), h(block % a.H), S(a.S), d(a.d), D(a.H * a.d) {}
  int64_t fused(int part) const { return m * S * 3 * D + part * D + h * d; }
  int64_t merged() const { return m * S * D + h * d; }
  int64_t square(int64_t H) const { return (m * H + h) * S * S; }
};

template <typename scalar_t>
const scalar_t* in(const void* p) {
  return static_cast<const scalar_t*>(p);
}
template <typename scalar_t>
scalar_t* out(void* p) {
  return static_cast<scalar_t*>(p);
}

// Loads part `part` (0 q, 1 k, 2 v) of a fused [M, S, 3 D] tensor's block.
template <typename scalar_t, typename acc_t>
MK_CPU_INLINE acc_t* load_part(const void* fused, const Block& b, int part, Scratch<acc_t>& s) {
  acc_t* dst = s.take(b.S * b.d);
  load_rows(in<scalar_t>(fused) + b.fused(part), 3 * b.D, b.S, b.d, dst);
  return dst;
}

// The three parts of a fused [M, S, 3 D] tensor's block: q, k, v (or their cotangents).
template <typename acc_t>
struct Parts {
  const acc_t *q, *k, *v;
};
template <typename scalar_t, typename acc_t>
MK_CPU_INLINE Parts<acc_t> load_parts(const void* fused, const Block& b, Scratch<acc_t>& s) {
  return {load_part<scalar_t>(fused, b, 0, s), load_part<scalar_t>(fused, b, 1, s), load_part<scalar_t>(fused, b, 2, s)};
}

template <typename scalar_t, typename acc_t>
MK_CPU_INLINE acc_t* load_merged(const void* merged, const Block& b, Scratch<acc_t>& s) {
  acc_t* dst = s.take(b.S * b.d);
  load_rows(in<scalar_t>(merged) + b.merged(), b.D, b.S, b.d, dst);
  return dst;
}

// Stores an [S, d] result into part `part` of a fused [M, S, 3 D] tensor's block, or into a merged [M, S, D]
// tensor's block.
template <typename acc_t, typename scalar_t>
MK_CPU_INLINE void store_part(const acc_t* rows, const Block& b, int part, scalar_t* fused) {
  store_rows(rows, b.S, b.d, fused + b.fused(part), 3 * b.D);
}
template <typename acc_t, typename scalar_t>
MK_CPU_INLINE void store_merged(const acc_t* rows, const Block& b, scalar_t* merged) {
  store_rows(rows, b.S, b.d, merged + b.merged(), b.D);
}

template <typename acc_t>
MK_CPU_INLINE acc_t* transposed(const acc_t* rows, const Block& b, Scratch<acc_t>& s) {
  acc_t* dst = s.take(b.d * b.S);
  transpose(rows, b.S, b.d, dst);
  return dst;
}

template <typename scalar_t, typename acc_t>
MK_CPU_INLINE acc_t* load_square(const void* squares, const Block& b, int64_t H, Scratch<acc_t>& s) {
  acc_t* dst = s.take(b.S * b.S);
  load_transposed(in<scalar_t>(squares) + b.square(H), b.S, dst);
  return dst;
}

// forward: P = causal_softmax(scale q k^T), o = P v.
template <typename scalar_t>
MK_CPU_CLONES_FMA void forward_block(const AttentionArgs& a, int64_t block, Scratch<acc_of<scalar_t>>& s) {
  using acc_t = acc_of<scalar_t>;
  const Block b(a, block);
  const int64_t S = b.S, d = b.d;
  const auto [q, k, v] = load_parts<scalar_t>(a.qkv, b, s);
  acc_t *pT = s.take(S * S), *o = s.take(S * d);
  causal_products(k, transposed(q, b, s), S, d, pT, false);
  for (int64_t j = 0; j < S; ++j) {
#pragma omp simd
    for (int64_t i = j; i < S; ++i) pT[j * S + i] *= static_cast<acc_t>(a.scale);
  }
  causal_softmax_columns(pT, S, s.take(S), s.take(S));
  sum_over_keys(pT, v, S, d, o, false);
  store_merged(o, b, out<scalar_t>(a.out));
  store_transposed(pT, S, out<scalar_t>(a.out_p) + b.square(a.H));
}

// backward: G = do v^T, dZ = scale P (G - c), dq = dZ k, dk = dZ^T q, dv = P^T do (G and dZ stored where
// their outputs are given).
template <typename scalar_t>
MK_CPU_CLONES_FMA void backward_block(const AttentionArgs& a, int64_t block, Scratch<acc_of<scalar_t>>& s) {
  using acc_t = acc_of<scalar_t>;
  const Block b(a, block);
  const int64_t S = b.S, d = b.d;
  const auto [q, k, v] = load_parts<scalar_t>(a.qkv, b, s);
  const acc_t* dout = load_merged<scalar_t>(a.dout, b, s);
  const acc_t* pT = load_square<scalar_t>(a.p, b, a.H, s);
  acc_t *gT = s.take(S * S), *dzT = s.take(S * S), *grad = s.take(S * d);
  causal_products(v, transposed(dout, b, s), S, d, gT, false);
  softmax_backward_columns(pT, gT, S, static_cast<acc_t>(a.scale), s.take(S), dzT);
  if (a.out_p != nullptr) store_transposed(gT, S, out<scalar_t>(a.out_p) + b.square(a.H));
  if (a.out_dz != nullptr) store_transposed(dzT, S, out<scalar_t>(a.out_dz) + b.square(a.H));
  scalar_t* dqkv = out<scalar_t>(a.out);
  sum_over_keys(dzT, k, S, d, grad, false);
  store_part(grad, b, 0, dqkv);
  sum_over_queries(dzT, q, S, d, grad, false);
  store_part(grad, b, 1, dqkv);
  sum_over_queries(pT, dout, S, d, grad, false);
  store_part(grad, b, 2, dqkv);
}

// double backward, for the cotangents (aq, ak, av) of (dq, dk, dv): A = aq k^T + q ak^T,
// dG = scale P (A - <P, A>),  dP = scale (A (G - <P, G>) - <P, A> G) + do av^T,  dZp = scale P (dP - <P, dP>),
// d(do) = P av + dG v,  dq = dZ ak + dZp k,  dk = dZ^T aq + dZp^T q,  dv = dG^T do  (<., .> per query).
template <typename scalar_t>
MK_CPU_CLONES_FMA void double_backward_block(const AttentionArgs& a, int64_t block, Scratch<acc_of<scalar_t>>& s) {
  using acc_t = acc_of<scalar_t>;
  const Block b(a, block);
  const int64_t S = b.S, d = b.d;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const auto [q, k, v] = load_parts<scalar_t>(a.qkv, b, s);
  const auto [aq, ak, av] = load_parts<scalar_t>(a.grad_grads, b, s);
  const acc_t* dout = load_merged<scalar_t>(a.dout, b, s);
  const acc_t* pT = load_square<scalar_t>(a.p, b, a.H, s);
  const acc_t* gT = load_square<scalar_t>(a.g, b, a.H, s);
  const acc_t* dzT = load_square<scalar_t>(a.dz, b, a.H, s);
  acc_t *big_aT = s.take(S * S), *dgT = s.take(S * S), *dpT = s.take(S * S), *grad = s.take(S * d);
  causal_products(k, transposed(aq, b, s), S, d, big_aT, false);
  causal_products(ak, transposed(q, b, s), S, d, big_aT, true);
  acc_t *c = s.take(S), *c_a = s.take(S);
  query_sums(pT, gT, S, c);
  softmax_backward_columns(pT, big_aT, S, scale, c_a, dgT);  // dG; c_a = <P, A>
  causal_products(av, transposed(dout, b, s), S, d, dpT, false);  // (do av^T)^T
  for (int64_t j = 0; j < S; ++j) {
#pragma omp simd
    for (int64_t i = j; i < S; ++i) {
      const int64_t e = j * S + i;
      dpT[e] += scale * (big_aT[e] * (gT[e] - c[i]) - c_a[i] * gT[e]);
    }
  }
  acc_t* dzpT = big_aT;  // A is not needed any more
  softmax_backward_columns(pT, dpT, S, scale, c, dzpT);
  sum_over_keys(pT, av, S, d, grad, false);
  sum_over_keys(dgT, v, S, d, grad, true);
  store_merged(grad, b, out<scalar_t>(a.out_ddout));
  scalar_t* dqkv = out<scalar_t>(a.out);
  sum_over_keys(dzT, ak, S, d, grad, false);
  sum_over_keys(dzpT, k, S, d, grad, true);
  store_part(grad, b, 0, dqkv);
  sum_over_queries(dzT, aq, S, d, grad, false);
  sum_over_queries(dzpT, q, S, d, grad, true);
  store_part(grad, b, 1, dqkv);
  sum_over_queries(dgT, dout, S, d, grad, false);
  store_part(grad, b, 2, dqkv);
}

// Runs block_fn(tag) (the pass's block function for the dtype of `tag`) on every (sequence, head) block.
template <typename BlockFnFor>
void for_each_block(DType dtype, const AttentionArgs& a, BlockFnFor block_fn) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto tag) {
    const auto run = block_fn(tag);
    at::parallel_for(0, a.M * a.H, grain_for(a.S * a.S * a.d), [&](int64_t begin, int64_t end) {
      Scratch<acc_of<decltype(tag)>> scratch(a.S, a.d);
      for (int64_t block = begin; block < end; ++block) {
        scratch.reset();
        run(a, block, scratch);
      }
    });
  });
}

}  // namespace

void attention_forward_cpu(DType dtype, const AttentionArgs& a) {
  for_each_block(dtype, a, [](auto tag) { return forward_block<decltype(tag)>; });
}

void attention_backward_cpu(DType dtype, const AttentionArgs& a) {
  for_each_block(dtype, a, [](auto tag) { return backward_block<decltype(tag)>; });
}

void attention_double_backward_cpu(DType dtype, const AttentionArgs& a) {
  for_each_block(dtype, a, [](auto tag) { return double_backward_block<decltype(tag)>; });
}

}  // namespace mk
