// CPU kernels of the fused learned-optimizer step: the math of csrc/lopt_math.h on blocks of kLanes
// parameters (lane-minor scratch, so every per-element loop vectorises over the lanes), threaded with
// parallel_for_stealing (work_stealing.h).
//
// Work is cut into jobs of at most kChunk elements that never cross a (task, segment) boundary, in the
// order task, segment, index.  Per-segment reductions are per-job partials summed in job order, and the
// MLP weight gradient is accumulated per group of consecutive jobs (a fixed number of groups, whatever
// the thread count) and the groups summed in order: every reduction is deterministic.
//
// Forward:  pass 0 sums f_k^2 per job -> norms n[t, seg, k]; pass 1 computes the new state and p'.
// Backward: pass A recomputes the forward of each element, back-propagates through the MLP and the
//           features with df = n * dx (writing dp, dg, ds and the weight gradient) and sums
//           c[t, seg, k] = sum_i dx_ik f_ik; pass B adds the normaliser's term, df_ik = -n^3 f_ik c / N,
//           which needs the whole segment's c first.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../dispatch.h"
#include "../lopt_kernels.h"
#include "aligned_buffer.h"
#include "clones.h"
#include "lopt_element_major.h"
#include "vector_math.h"
#include "work_stealing.h"

namespace mk {
namespace {

// NOTE: 32 lanes = four AVX2 (two AVX-512) registers per accumulator row of the MLP.
constexpr int kLanes = 32;
constexpr int kAvx2VectorBytes = 32;    // the vector width of the AVX2 / baseline instance of the MLP
constexpr int kAvx512VectorBytes = 64;  // ... and of its AVX-512 instance
constexpr int64_t kChunk = 1024;
constexpr int kOuterBlocks = 4;  // blocks of kLanes per weight-gradient accumulation (lopt_lanes_outer)
constexpr int64_t kGroups = 64;
constexpr int64_t kPrefetchAhead = 8 * kLanes;  // elements ahead of the block being loaded (1 KB of fp32)
constexpr int F = kLoptFeatures;

struct Job {
  int64_t t, seg, begin, end;
};

std::vector<Job> make_jobs(const LoptArgs& a) {
  std::vector<Job> jobs;
  for (int64_t t = 0; t < a.T; ++t)
    for (int64_t s = 0; s < a.nseg; ++s)
      for (int64_t i = a.seg_offsets[s]; i < a.seg_offsets[s + 1]; i += kChunk)
        jobs.push_back({t, s, i, std::min(i + kChunk, a.seg_offsets[s + 1])});
  return jobs;
}

// Pointers of one job's element range in the [T, P] / [4, T, P] operands.
template <typename scalar_t>
struct Rows {
  const scalar_t* p;
  const scalar_t* g;
  const scalar_t* s;  // plane j at s + j * plane
  int64_t plane;
  int64_t to_end;  // elements from the job's first to the end of its plane
  Rows(const LoptArgs& a, const Job& j)
      : p(static_cast<const scalar_t*>(a.param) + j.t * a.P + j.begin),
        g(static_cast<const scalar_t*>(a.grad) + j.t * a.P + j.begin),
        s(static_cast<const scalar_t*>(a.state) + j.t * a.P + j.begin),
        plane(a.T * a.P),
        to_end(a.T * a.P - (j.t * a.P + j.begin)) {}
};

// Software prefetch (kForWrite: for writing) of the cache lines of elements [i, i + kLanes) in `count`
// planes `plane` elements apart from base, those before `end`.  NOTE: on the Zen 5 hosts here the hardware
// prefetcher alone left every pass over P = 1e6 elements waiting on memory: the hidden=4 forward ran
// 14.5 ms on one thread against 7.2 ms with its input planes prefetched kPrefetchAhead elements ahead, and
// 5.2-7.4 ms with its output planes too (RESULTS.md, twentieth session).
template <int kForWrite = 0, typename scalar_t>
MK_LANES_INLINE void prefetch_lanes(const scalar_t* base, int64_t plane, int count, int64_t i, int64_t end) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  for (int j = 0; j < count; ++j)
    for (int64_t q = i; q < std::min(i + kLanes, end); q += kLine) __builtin_prefetch(base + j * plane + q, kForWrite);
}

// Loads up to kLanes elements into lane slots, zero-padding the tail.
template <typename acc_t, typename scalar_t>
MK_LANES_INLINE void load_lanes(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int l = 0; l < kLanes; ++l) dst[l] = l < n ? static_cast<acc_t>(src[l]) : acc_t(0);
}

// Raw features and new state of one block of lanes.
template <typename acc_t, typename scalar_t>
struct Block {
  alignas(64) acc_t p[kLanes], g[kLanes], s[kLoptStates * kLanes], s_new[kLoptStates * kLanes], f[F * kLanes];
  alignas(64) acc_t x[F * kLanes], out[2 * kLanes];  // normalised features, MLP outputs (d, q)

  MK_LANES_INLINE void load(const LoptConsts<acc_t>& c, const Rows<scalar_t>& r, int64_t i, int64_t n) {
    prefetch_lanes(r.p, 0, 1, i + kPrefetchAhead, r.to_end);
    prefetch_lanes(r.g, 0, 1, i + kPrefetchAhead, r.to_end);
    prefetch_lanes(r.s, r.plane, kLoptStates, i + kPrefetchAhead, r.to_end);
    load_lanes(r.p + i, n, p);
    load_lanes(r.g + i, n, g);
    for (int j = 0; j < kLoptStates; ++j) load_lanes(r.s + j * r.plane + i, n, s + j * kLanes);
    lopt_features<kLanes>(c, p, g, s, s_new, f);
  }

  // Loads elements [i, i + n) and their normalised features x = f * norm.
  MK_LANES_INLINE void load_normalised(const LoptConsts<acc_t>& c, const Rows<scalar_t>& r, int64_t i, int64_t n,
                                       const acc_t* norm) {
    load(c, r, i, n);
    for (int k = 0; k < F; ++k)
      for (int l = 0; l < kLanes; ++l) x[k * kLanes + l] = f[k * kLanes + l] * norm[k];
  }
};

// e_l = exp(exp_mult q_l) over one block: the step's magnitude factor, vectorised where libmvec has expf
// (vector_math.h).  NOTE: called one element at a time inside the store loop, scalar expf kept that loop
// scalar: the forward at hidden=4, P = 1e6, one thread took 15.6 ms against 7.5 ms since.
template <typename acc_t>
MK_LANES_INLINE void lopt_exp_lanes(const LoptConsts<acc_t>& c, const acc_t* q, acc_t* e) {
  MK_SIMD
  for (int l = 0; l < kLanes; ++l) e[l] = std::exp(c.exp_mult * q[l]);
}

template <typename acc_t, typename scalar_t>
MK_CPU_CLONES_FMA void moments_job(const LoptConsts<acc_t> c, const Rows<scalar_t> r, int64_t n, double* out) {
  Block<acc_t, scalar_t> b;
  acc_t acc[F * kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    b.load(c, r, i, std::min<int64_t>(kLanes, n - i));
    for (int k = 0; k < F * kLanes; ++k) acc[k] += b.f[k] * b.f[k];
  }
  for (int k = 0; k < F; ++k) {
    double sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += static_cast<double>(acc[k * kLanes + l]);
    out[k] = sum;
  }
}

// dst[l] = v[l] (kAdd: dst[l] += v[l]) for the m <= kLanes elements of one block.  NOTE: a full block is a
// fixed-count loop that vectorises; one loop over all outputs with a branch per output per element stayed
// scalar (~7% of the hidden=4 backward's samples).
template <bool kAdd, typename acc_t, typename scalar_t>
MK_LANES_INLINE void store_lanes(scalar_t* __restrict__ dst, const acc_t* __restrict__ v, int64_t m) {
  const auto put = [&](int l) { dst[l] = static_cast<scalar_t>(kAdd ? static_cast<acc_t>(dst[l]) + v[l] : v[l]); };
  if (m == kLanes) {
    MK_SIMD
    for (int l = 0; l < kLanes; ++l) put(l);
  } else {
    for (int l = 0; l < m; ++l) put(l);
  }
}

// kElementMajor: the MLP of lopt_element_major.h with the weights `packed`, else the lanes MLP (`packed` unused).
// po and so may be r.p and r.s themselves (the in-place step): each block is loaded into `b` before its
// elements are stored, so they are not __restrict__ here; each output plane is stored from scratch by its
// own store_lanes, whose full-block loop vectorises without knowing that the planes do not overlap.
template <int VB, bool kElementMajor, int kHidden, typename acc_t, typename scalar_t>
MK_LANES_INLINE void forward_job(const LoptConsts<acc_t> c, const acc_t* __restrict__ w, const EmWeights<acc_t>* packed,
                                 int hidden, int layers, const acc_t* __restrict__ norm, const Rows<scalar_t> r,
                                 int64_t n, scalar_t* po, scalar_t* so,
                                 acc_t* __restrict__ act) {
  const int H = kHidden ? kHidden : hidden;
  Block<acc_t, scalar_t> b;
  alignas(64) acc_t e[kLanes], p_new[kLanes];
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - i);
    b.load_normalised(c, r, i, m, norm);
    if constexpr (kElementMajor) em_mlp_forward<kLanes, VB>(w, *packed, H, layers, b.x, act, b.out);
    else lopt_mlp_forward<kLanes, VB>(w, H, layers, b.x, act, b.out);
    lopt_exp_lanes(c, b.out + kLanes, e);
    MK_SIMD
    for (int l = 0; l < kLanes; ++l) p_new[l] = b.p[l] - c.step_mult * b.out[l] * e[l];
    prefetch_lanes<1>(po, 0, 1, i + kPrefetchAhead, r.to_end);
    prefetch_lanes<1>(so, r.plane, kLoptStates, i + kPrefetchAhead, r.to_end);
    store_lanes<false>(po + i, p_new, m);
    for (int j = 0; j < kLoptStates; ++j) store_lanes<false>(so + j * r.plane + i, b.s_new + j * kLanes, m);
  }
}

// Cotangents flowing into one job: gp/gs may be nullptr (zero).
template <typename scalar_t>
struct OutCotangents {
  const scalar_t* gp;
  const scalar_t* gs;
};

// The per-element input cotangents of one block, before they are stored.
template <typename acc_t>
struct BlockGrads {
  alignas(64) acc_t dp[kLanes], dg[kLanes], ds[kLoptStates * kLanes];
};

// Stores (kAdd: adds to) the requested input cotangents of one block.
template <bool kAdd, typename acc_t, typename scalar_t>
MK_LANES_INLINE void store_grads(const LoptArgs& a, const Job& j, int64_t i, int64_t m, const BlockGrads<acc_t>& d) {
  const int64_t job = j.t * a.P + j.begin, plane = a.T * a.P;
  const auto put = [&](void* dst, const acc_t* v, int count) {
    scalar_t* planes = static_cast<scalar_t*>(dst) + job;
    prefetch_lanes<1>(planes, plane, count, i + kPrefetchAhead, plane - job);
    for (int s = 0; s < count; ++s) store_lanes<kAdd>(planes + s * plane + i, v + s * kLanes, m);
  };
  if (a.d_param) put(a.d_param, d.dp, 1);
  if (a.d_grad) put(a.d_grad, d.dg, 1);
  if (a.d_state) put(a.d_state, d.ds, kLoptStates);
}

// Scratch of one backward job: x, activations and dz (then dout) of kOuterBlocks blocks, whose weight
// gradient is accumulated at once (see lopt_lanes_outer), the weight gradient's partial sums, and the
// element-major MLP's first-layer dz in lanes (em_mlp_backward).
template <typename acc_t>
struct BackwardScratch {
  int64_t x_stride, act_stride, dz_stride;
  AlignedVector<acc_t> x, act, dz, dw_lanes, dz_lanes;
  BackwardScratch(int H, int layers, int64_t nw)
      : x_stride(F * kLanes),
        act_stride(static_cast<int64_t>(layers) * H * kLanes),
        dz_stride((static_cast<int64_t>(layers) * H + 2) * kLanes),
        x(kOuterBlocks * x_stride),
        act(kOuterBlocks * act_stride),
        dz(kOuterBlocks * dz_stride),
        dw_lanes(nw * kLoptVecLanes<acc_t, kAvx512VectorBytes>),  // room for either instance
        dz_lanes(static_cast<int64_t>(H) * kLanes) {}
};

// Pass A of the backward for one job; returns c_k = sum_i dx_ik f_ik in c_out and accumulates the
// weight gradient into dw (double, nw weights), once at the end of the job, from acc_t partial sums in
// scratch.dw_lanes.  kElementMajor: the MLP of lopt_element_major.h (activations [L][H], the weight
// gradient's sums one per weight; `packed` its weights), else the lanes MLP of lopt_math.h (activations
// [H][L], kLoptVecLanes partial sums per weight; `packed` unused).
template <int VB, bool kElementMajor, int kHidden, typename acc_t, typename scalar_t>
MK_LANES_INLINE void backward_job(const LoptConsts<acc_t> c, const acc_t* __restrict__ w, const EmWeights<acc_t>* packed,
                                  int hidden, int layers, const acc_t* __restrict__ norm, const Rows<scalar_t> r,
                                  const OutCotangents<scalar_t> cot, const LoptArgs& a, const Job& j, int64_t nw,
                                  double* __restrict__ dw, double* __restrict__ c_out, BackwardScratch<acc_t>* scratch) {
  const int H = kHidden ? kHidden : hidden;
  constexpr int VL = kElementMajor ? 1 : kLoptVecLanes<acc_t, VB>;
  acc_t* __restrict__ dw_lanes = scratch->dw_lanes.data();
  std::fill(dw_lanes, dw_lanes + nw * VL, acc_t(0));
  Block<acc_t, scalar_t> b;
  BlockGrads<acc_t> d;
  alignas(64) acc_t dx[F * kLanes], df[F * kLanes];
  alignas(64) acc_t gp[kLanes], gs[kLoptStates * kLanes];
  acc_t csum[F * kLanes] = {};
  const int64_t n = j.end - j.begin, dout_offset = static_cast<int64_t>(layers) * H * kLanes;
  int slot = 0;  // this block's place among the kOuterBlocks whose weight gradient is pending
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - i);
    acc_t* x = scratch->x.data() + slot * scratch->x_stride;
    acc_t* act = scratch->act.data() + slot * scratch->act_stride;
    acc_t* dz = scratch->dz.data() + slot * scratch->dz_stride;
    b.load_normalised(c, r, i, m, norm);
    if constexpr (kElementMajor) em_mlp_forward<kLanes, VB>(w, *packed, H, layers, b.x, act, b.out);
    else lopt_mlp_forward<kLanes, VB>(w, H, layers, b.x, act, b.out);
    std::copy(b.x, b.x + F * kLanes, x);
    const acc_t* out = b.out;
    if (cot.gp) prefetch_lanes(cot.gp, 0, 1, i + kPrefetchAhead, r.to_end);
    if (cot.gs) prefetch_lanes(cot.gs, r.plane, kLoptStates, i + kPrefetchAhead, r.to_end);
    if (cot.gp) load_lanes(cot.gp + i, m, gp);
    else std::fill(gp, gp + kLanes, acc_t(0));
    acc_t* dout = dz + dout_offset;
    alignas(64) acc_t e[kLanes];
    lopt_exp_lanes(c, out + kLanes, e);
    for (int l = 0; l < kLanes; ++l) {
      // step = step_mult d e, e = exp(exp_mult q); p' = p - step
      const acc_t dstep = -gp[l] * c.step_mult * e[l];
      dout[l] = dstep;
      dout[kLanes + l] = dstep * out[l] * c.exp_mult;
    }
    if constexpr (kElementMajor)
      em_mlp_backward<kLanes, VB>(w, H, layers, act, dout, dz, scratch->dz_lanes.data(), dx, dw_lanes);
    else lopt_mlp_backward<kLanes, VB>(w, H, layers, x, act, dout, dz, dx);
    if (++slot == kOuterBlocks || i + kLanes >= n) {
      BackwardScratch<acc_t>& q = *scratch;
      if constexpr (kElementMajor)
        em_mlp_weight_grad<kLanes, VB>(H, layers, slot, q.x.data(), q.x_stride, q.act.data(), q.act_stride, q.dz.data(),
                                       q.dz_stride, dw_lanes);
      else
        lopt_mlp_weight_grad<kLanes, VB>(H, layers, slot, q.x.data(), q.x_stride, q.act.data(), q.act_stride,
                                         q.dz.data(), q.dz_stride, dw_lanes);
      slot = 0;
    }
    for (int k = 0; k < F; ++k)
      for (int l = 0; l < kLanes; ++l) {
        csum[k * kLanes + l] += dx[k * kLanes + l] * b.f[k * kLanes + l];
        df[k * kLanes + l] = dx[k * kLanes + l] * norm[k];
      }
    if (cot.gs)
      for (int s = 0; s < kLoptStates; ++s) load_lanes(cot.gs + s * r.plane + i, m, gs + s * kLanes);
    lopt_features_backward<kLanes>(c, b.g, b.s_new, df, cot.gs ? gs : nullptr, d.dp, d.dg, d.ds);
    MK_SIMD
    for (int l = 0; l < kLanes; ++l) d.dp[l] += gp[l];  // p' = p - step: the direct term
    store_grads<false, acc_t, scalar_t>(a, j, i, m, d);
  }
  for (int k = 0; k < F; ++k) {
    double sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += static_cast<double>(csum[k * kLanes + l]);
    c_out[k] = sum;
  }
  if constexpr (kElementMajor) {
    em_add_weight_grad(dw_lanes, H, nw, dw);
  } else {
    for (int64_t q = 0; q < nw; ++q) {
      double sum = 0;
      for (int i = 0; i < VL; ++i) sum += static_cast<double>(dw_lanes[q * VL + i]);
      dw[q] += sum;
    }
  }
}

// The MLP jobs as compiled functions: 256-bit vectors in the AVX2 and baseline clones, 512-bit vectors
// in the AVX-512 instance, which run_job calls where the CPU has AVX-512.
// kHidden > 0 compiles a job for that hidden size, every stride and trip count of the MLP a constant (at
// hidden=32 the forward and forward + backward took ~0.93x the run-time instance's time: RESULTS.md);
// kHidden = 0 takes the hidden size at run time.
template <bool kElementMajor, int kHidden, typename... Args>
MK_CPU_CLONES_FMA void forward_job_256(Args... args) {
  forward_job<kAvx2VectorBytes, kElementMajor, kHidden>(args...);
}
template <bool kElementMajor, int kHidden, typename... Args>
MK_CPU_CLONES_FMA void backward_job_256(Args... args) {
  backward_job<kAvx2VectorBytes, kElementMajor, kHidden>(args...);
}
#if MK_CPU_AVX512_PATH
template <bool kElementMajor, int kHidden, typename... Args>
MK_CPU_AVX512 void forward_job_512(Args... args) {
  forward_job<kAvx512VectorBytes, kElementMajor, kHidden>(args...);
}
template <bool kElementMajor, int kHidden, typename... Args>
MK_CPU_AVX512 void backward_job_512(Args... args) {
  backward_job<kAvx512VectorBytes, kElementMajor, kHidden>(args...);
}
#endif

// The hidden size compiled in its own instance of the jobs: the default one (LearnedOptimizer's hidden=32).
constexpr int kCompiledHidden = 32;

// The vector width of the job instances that run_job calls.
inline int job_vector_bytes() {
#if MK_CPU_AVX512_PATH
  if (cpu_uses_avx512()) return kAvx512VectorBytes;
#endif
  return kAvx2VectorBytes;
}

// The element-major MLP where the hidden size fills whole vectors of the instance, the lanes MLP otherwise
// (small hidden sizes: hidden=4 would fill a quarter of each vector).
template <typename acc_t>
bool use_element_major(int H) {
  return H % (job_vector_bytes() / static_cast<int>(sizeof(acc_t))) == 0;
}

// The MLP's weights packed for the element-major jobs, or nullptr where the lanes MLP runs.
template <typename acc_t>
std::unique_ptr<const EmWeights<acc_t>> pack_for_jobs(const acc_t* w, int H, int layers) {
  return use_element_major<acc_t>(H) ? std::make_unique<const EmWeights<acc_t>>(w, H, layers) : nullptr;
}

// Calls the instance of a job (forward or backward) for this CPU's vector width, the MLP's layout and the
// hidden size.
template <bool kBackward, bool kElementMajor, int kHidden, typename... Args>
void call_job(Args... args) {
#if MK_CPU_AVX512_PATH
  if (job_vector_bytes() == kAvx512VectorBytes) {
    if constexpr (kBackward) return backward_job_512<kElementMajor, kHidden>(args...);
    else return forward_job_512<kElementMajor, kHidden>(args...);
  }
#endif
  if constexpr (kBackward) backward_job_256<kElementMajor, kHidden>(args...);
  else forward_job_256<kElementMajor, kHidden>(args...);
}

// A job with the element-major MLP where `packed` holds its weights (use_element_major), else the lanes one.
template <bool kBackward, typename acc_t, typename... Args>
void run_job(const LoptConsts<acc_t> c, const acc_t* w, const EmWeights<acc_t>* packed, int H, Args... args) {
  if (!packed) return call_job<kBackward, false, 0>(c, w, packed, H, args...);
  if (H == kCompiledHidden) return call_job<kBackward, true, kCompiledHidden>(c, w, packed, H, args...);
  call_job<kBackward, true, 0>(c, w, packed, H, args...);
}

// Pass B for one job: adds the normaliser's term df_ik = coef_k f_ik.
template <typename acc_t, typename scalar_t>
MK_CPU_CLONES_FMA void normaliser_job(const LoptConsts<acc_t> c, const acc_t* __restrict__ coef, const Rows<scalar_t> r,
                                  const LoptArgs& a, const Job& j) {
  Block<acc_t, scalar_t> b;
  BlockGrads<acc_t> d;
  alignas(64) acc_t df[F * kLanes];
  const int64_t n = j.end - j.begin;
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - i);
    b.load(c, r, i, m);
    for (int k = 0; k < F; ++k)
      for (int l = 0; l < kLanes; ++l) df[k * kLanes + l] = b.f[k * kLanes + l] * coef[k];
    lopt_features_backward<kLanes>(c, b.g, b.s_new, df, nullptr, d.dp, d.dg, d.ds);
    store_grads<true, acc_t, scalar_t>(a, j, i, m, d);
  }
}

// Index of each (task, segment)'s first job, plus the end: jobs of (t, s) are [first[ts], first[ts + 1]).
std::vector<int64_t> first_jobs(const std::vector<Job>& jobs, const LoptArgs& a) {
  std::vector<int64_t> first(a.T * a.nseg + 1, static_cast<int64_t>(jobs.size()));
  for (int64_t k = static_cast<int64_t>(jobs.size()) - 1; k >= 0; --k) first[jobs[k].t * a.nseg + jobs[k].seg] = k;
  for (int64_t ts = a.T * a.nseg - 1; ts >= 0; --ts) first[ts] = std::min(first[ts], first[ts + 1]);
  return first;
}

template <typename scalar_t>
void forward_impl(const LoptHyper& h, const LoptArgs& a) {
  using acc_t = typename AccType<scalar_t>::type;
  const LoptConsts<acc_t> c(h);
  const std::vector<Job> jobs = make_jobs(a);
  const int64_t njobs = static_cast<int64_t>(jobs.size());
  std::vector<double> partial(njobs * F);
  parallel_for_stealing(njobs, [&](const auto& next) {
    for (int64_t k; (k = next()) >= 0;)
      moments_job<acc_t>(c, Rows<scalar_t>(a, jobs[k]), jobs[k].end - jobs[k].begin, &partial[k * F]);
  });
  const std::vector<int64_t> first = first_jobs(jobs, a);
  acc_t* norms = static_cast<acc_t*>(a.norms);
  for (int64_t ts = 0; ts < a.T * a.nseg; ++ts) {
    const int64_t seg = ts % a.nseg;
    const double count = static_cast<double>(a.seg_offsets[seg + 1] - a.seg_offsets[seg]);
    for (int k = 0; k < F; ++k) {
      double sum = 0;
      for (int64_t q = first[ts]; q < first[ts + 1]; ++q) sum += partial[q * F + k];
      norms[ts * F + k] = static_cast<acc_t>(1.0 / std::sqrt(sum / count + h.eps_n));
    }
  }
  const acc_t* w = static_cast<const acc_t*>(a.weights);
  const std::unique_ptr<const EmWeights<acc_t>> packed = pack_for_jobs(w, a.H, a.layers);
  parallel_for_stealing(njobs, [&](const auto& next) {
    AlignedVector<acc_t> act(static_cast<size_t>(a.layers) * a.H * kLanes);
    for (int64_t k; (k = next()) >= 0;) {
      const Job& j = jobs[k];
      const int64_t off = j.t * a.P + j.begin;
      run_job<false>(c, w, packed.get(), a.H, a.layers, norms + (j.t * a.nseg + j.seg) * F, Rows<scalar_t>(a, j),
                     j.end - j.begin, static_cast<scalar_t*>(a.param_out) + off,
                     static_cast<scalar_t*>(a.state_out) + off, act.data());
    }
  });
}

template <typename scalar_t>
void backward_impl(const LoptHyper& h, const LoptArgs& a) {
  using acc_t = typename AccType<scalar_t>::type;
  const LoptConsts<acc_t> c(h);
  const std::vector<Job> jobs = make_jobs(a);
  const int64_t njobs = static_cast<int64_t>(jobs.size());
  const int64_t groups = std::min<int64_t>(kGroups, std::max<int64_t>(njobs, 1));
  const int64_t nw = lopt_num_weights(a.H, a.layers);
  const acc_t* w = static_cast<const acc_t*>(a.weights);
  const acc_t* norms = static_cast<const acc_t*>(a.norms);
  std::vector<double> dw_groups(groups * nw, 0.0), c_partial(njobs * F);
  const std::unique_ptr<const EmWeights<acc_t>> packed = pack_for_jobs(w, a.H, a.layers);
  parallel_for_stealing(groups, [&](const auto& next) {
    BackwardScratch<acc_t> scratch(a.H, a.layers, nw);
    for (int64_t g; (g = next()) >= 0;) {
      for (int64_t k = g * njobs / groups; k < (g + 1) * njobs / groups; ++k) {
        const Job& j = jobs[k];
        const int64_t off = j.t * a.P + j.begin;
        const OutCotangents<scalar_t> cot{
            a.grad_param_out ? static_cast<const scalar_t*>(a.grad_param_out) + off : nullptr,
            a.grad_state_out ? static_cast<const scalar_t*>(a.grad_state_out) + off : nullptr};
        run_job<true>(c, w, packed.get(), a.H, a.layers, norms + (j.t * a.nseg + j.seg) * F, Rows<scalar_t>(a, j), cot,
                      a, j, nw, &dw_groups[g * nw], &c_partial[k * F], &scratch);
      }
    }
  });
  acc_t* dw = static_cast<acc_t*>(a.d_weights);
  for (int64_t q = 0; q < nw; ++q) {
    double sum = 0;
    for (int64_t g = 0; g < groups; ++g) sum += dw_groups[g * nw + q];
    dw[q] = static_cast<acc_t>(sum);
  }
  if (!a.d_param && !a.d_grad && !a.d_state) return;
  // coef[t, seg, k] = -n^3 c / N
  const std::vector<int64_t> first = first_jobs(jobs, a);
  std::vector<acc_t> coef(a.T * a.nseg * F);
  for (int64_t ts = 0; ts < a.T * a.nseg; ++ts) {
    const int64_t seg = ts % a.nseg;
    const double count = static_cast<double>(a.seg_offsets[seg + 1] - a.seg_offsets[seg]);
    for (int k = 0; k < F; ++k) {
      double sum = 0;
      for (int64_t q = first[ts]; q < first[ts + 1]; ++q) sum += c_partial[q * F + k];
      const double n = static_cast<double>(norms[ts * F + k]);
      coef[ts * F + k] = static_cast<acc_t>(-n * n * n * sum / count);
    }
  }
  parallel_for_stealing(njobs, [&](const auto& next) {
    for (int64_t k; (k = next()) >= 0;) {
      const Job& j = jobs[k];
      normaliser_job<acc_t>(c, &coef[(j.t * a.nseg + j.seg) * F], Rows<scalar_t>(a, j), a, j);
    }
  });
}

}  // namespace

void lopt_forward_cpu(DType dtype, const LoptHyper& hyper, const LoptArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto tag) { forward_impl<decltype(tag)>(hyper, a); });
}

void lopt_backward_cpu(DType dtype, const LoptHyper& hyper, const LoptArgs& a) {
  with_dtype<float, double, c10::BFloat16, c10::Half>(dtype, [&](auto tag) { backward_impl<decltype(tag)>(hyper, a); });
}

}  // namespace mk
