// CUDA kernels of the fused learned-optimizer step: the math of csrc/lopt_math.h with one parameter
// element per thread (L = 1).  No torch headers: `nvcc -arch=sm_90 -c csrc/cuda/lopt.cu` compiles alone.
//
// Forward:  moments_kernel (one block per job: per-feature sums of f^2, block-reduced in a fixed
//           order) -> per_segment_kernel (the jobs of each (task, segment) summed by one block in a
//           fixed tree) -> step_kernel (a 2-D grid over elements and tasks).
// Backward: backward_kernel, a fixed grid of blocks each walking the jobs j = block, block + grid, ...:
//           every thread recomputes its element's forward, back-propagates through the MLP and the
//           features (writing dp, dg, ds), and leaves x, the activations and the per-layer dz in shared
//           memory; the block then adds the job's weight gradient (the sum over its elements in acc_t, in
//           element order) to its own double-precision partial, and stores the job's
//           c_k = sum dx_k f_k.  reduce_weights_kernel sums the block partials in block order,
//           per_segment_kernel<kCoef> turns c into the normaliser's coefficients, normaliser_kernel
//           adds that term.
// Every reduction has a fixed order: results are deterministic, with no atomics.
#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../lopt_kernels.h"
#include "block_reduce.cuh"
#include "convert.cuh"

namespace mk {
namespace {

constexpr int F = kLoptFeatures;
constexpr int kJob = 64;                 // elements per job = threads per block of the job kernels
constexpr int kStepThreads = 256;
constexpr int kSegmentThreads = 256;
constexpr int64_t kBackwardBlocks = 1024;  // blocks of the backward, each with its own weight partial
constexpr int64_t kMaxGridY = 65535;
constexpr size_t kWeightAlign = 16;  // of the weights, for the fixed-shape kernels (see fixed_shape_ok)

template <typename scalar_t, typename acc_t>
struct Element {
  acc_t p, g, s[kLoptStates], s_new[kLoptStates], f[F];

  __device__ void load_and_features(const LoptConsts<acc_t>& c, const LoptArgs& a, int64_t t, int64_t i) {
    const int64_t index = t * a.P + i, plane = a.T * a.P;
    p = load<acc_t, scalar_t>(a.param, index);
    g = load<acc_t, scalar_t>(a.grad, index);
    for (int j = 0; j < kLoptStates; ++j) s[j] = load<acc_t, scalar_t>(a.state, j * plane + index);
    lopt_features<1>(c, &p, &g, s, s_new, f);
  }
};

// Job jid's task t, segment seg and first element begin: the (t, seg) whose jobs
// first_job[t * nseg + seg] .. first_job[t * nseg + seg + 1] - 1 hold jid, found by binary search (every
// segment has at least one element, so first_job increases strictly).
struct Job {
  int64_t t, seg, begin;
};

__device__ Job job_at(const LoptArgs& a, int64_t jid) {
  int64_t lo = 0, hi = a.T * a.nseg;  // first_job[lo] <= jid < first_job[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a.first_job[mid] <= jid) lo = mid;
    else hi = mid;
  }
  const int64_t seg = lo % a.nseg;
  return {lo / a.nseg, seg, a.dev_seg_offsets[seg] + (jid - a.first_job[lo]) * kJob};
}

template <typename scalar_t>
__global__ void moments_kernel(LoptHyper h, LoptArgs a, double* partial) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t sq[F][kJob];
  const LoptConsts<acc_t> c(h);
  const Job job = job_at(a, blockIdx.x);
  const int64_t t = job.t, i = job.begin + threadIdx.x, end = a.dev_seg_offsets[job.seg + 1];
  Element<scalar_t, acc_t> e;
  if (i < end) e.load_and_features(c, a, t, i);
  for (int k = 0; k < F; ++k) sq[k][threadIdx.x] = i < end ? e.f[k] * e.f[k] : acc_t(0);
  __syncthreads();
  if (threadIdx.x < F) {
    double sum = 0;
    for (int l = 0; l < kJob; ++l) sum += static_cast<double>(sq[threadIdx.x][l]);
    partial[blockIdx.x * F + threadIdx.x] = sum;
  }
}

// out[ts, k] = finish(sum over the jobs of ts of partial[job, k], ts, k), one block per (task, segment) ts:
// thread i sums jobs first + i, first + i + kSegmentThreads, ... in order, then block_reduce's fixed tree.
// NOTE: with one thread per (ts, k) walking all the jobs of ts, one load at a time, the forward took
// 62-66 ms at T = 1, P = 1e7 on an H200 for hidden = 4 and 32 alike (10 ms at T = 16, P = 1e6, hidden = 4,
// where each walk is 16 times shorter).
template <typename acc_t, bool kCoef>
__global__ void __launch_bounds__(kSegmentThreads) per_segment_kernel(LoptHyper h, LoptArgs a, const double* partial,
                                                                       const acc_t* norms, acc_t* out) {
  const int64_t ts = blockIdx.x, seg = ts % a.nseg;
  double sum[F] = {};
  for (int64_t j = a.first_job[ts] + threadIdx.x; j < a.first_job[ts + 1]; j += kSegmentThreads)
    for (int k = 0; k < F; ++k) sum[k] += partial[j * F + k];
  block_reduce<kSegmentThreads>(sum, Sum{});
  if (threadIdx.x != 0) return;
  const double count = static_cast<double>(a.dev_seg_offsets[seg + 1] - a.dev_seg_offsets[seg]);
  for (int k = 0; k < F; ++k) {
    const int64_t idx = ts * F + k;
    if (kCoef) {
      const double n = static_cast<double>(norms[idx]);
      out[idx] = static_cast<acc_t>(-n * n * n * sum[k] / count);
    } else {
      out[idx] = static_cast<acc_t>(rsqrt(sum[k] / count + h.eps_n));
    }
  }
}

// kH, kLayers > 0 fix the MLP's shape at compile time: its loops unroll and the activations stay in
// registers (ptxas: 0 bytes of stack for hidden = 32, two layers, against 560 bytes of local memory when
// the shape is read from a), and the weights must be 16-byte aligned: the compiler then loads 16 bytes at
// a time where the layout allows (hidden = 32, fp32: 360 of its 380 weight loads, against 1,458 4-byte
// loads for 1,399 FMAs unaligned; ptxas: 128 registers, no stack).
template <typename scalar_t, int kMaxHidden, int kH = 0, int kLayers = 0>
__global__ void step_kernel(LoptHyper h, LoptArgs a) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.P) return;
  const LoptConsts<acc_t> c(h);
  const acc_t* w = static_cast<const acc_t*>(kH > 0 ? __builtin_assume_aligned(a.weights, kWeightAlign) : a.weights);
  const acc_t* norms = static_cast<const acc_t*>(a.norms);
  for (int64_t t = blockIdx.y; t < a.T; t += gridDim.y) {
    Element<scalar_t, acc_t> e;
    e.load_and_features(c, a, t, i);
    const acc_t* n = norms + (t * a.nseg + a.seg_ids[i]) * F;
    acc_t x[F], act[kLoptMaxLayers * kMaxHidden], out[2];
    for (int k = 0; k < F; ++k) x[k] = e.f[k] * n[k];
    lopt_mlp_forward<1>(w, kH > 0 ? kH : a.H, kLayers > 0 ? kLayers : a.layers, x, act, out);
    const int64_t index = t * a.P + i, plane = a.T * a.P;
    store<scalar_t>(a.param_out, index, e.p - lopt_step(c, out[0], out[1]));
    for (int j = 0; j < kLoptStates; ++j) store<scalar_t>(a.state_out, j * plane + index, e.s_new[j]);
  }
}

// Shared-memory floats per element in the backward: x, activations, dz of every hidden layer, dout,
// df * f for c; +1 keeps the per-thread stride odd (no bank conflicts).
__host__ __device__ inline int backward_stride(int H, int layers) {
  const int n = F + 2 * layers * H + 2 + F;
  return n % 2 == 0 ? n + 1 : n;
}

// kH, kLayers > 0 fix the MLP's shape at compile time (as in step_kernel, weights 16-byte aligned): the
// element's x, activations, dz and dout are then computed in registers and copied to its shared-memory row
// for the weight gradient, and a compiler fence keeps the backward's weight loads out of the forward.
// NOTE (ptxas, sm_90, fp32, hidden = 32): 255 registers, an 80 B stack, 1,109 weight loads for 2,807 FMAs,
// where the generic kernel runs loops with a global and a shared load per FMA; without the fence the loads
// were hoisted and spilled (a 5.5 KB stack).  In double the fixed hidden = 32 kernel spills 12 KB: double
// keeps the generic one.
template <typename scalar_t, int kH = 0, int kLayers = 0>
__global__ void backward_kernel(LoptHyper h, LoptArgs a, double* dw_partial, double* c_partial) {
  using acc_t = typename AccType<scalar_t>::type;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int H = kH > 0 ? kH : a.H, layers = kLayers > 0 ? kLayers : a.layers, stride = backward_stride(H, layers);
  const int64_t nw = lopt_num_weights(H, layers);
  acc_t* mine = smem + threadIdx.x * stride;
  acc_t *x = mine, *act = x + F, *dz = act + layers * H, *dout = dz + layers * H, *cf = dout + 2;
  const LoptConsts<acc_t> c(h);
  const acc_t* w = static_cast<const acc_t*>(kH > 0 ? __builtin_assume_aligned(a.weights, kWeightAlign) : a.weights);
  const acc_t* norms = static_cast<const acc_t*>(a.norms);
  double* dw = dw_partial + blockIdx.x * nw;
  constexpr bool kFixed = kH > 0;
  acc_t x_r[kFixed ? F : 1], act_r[kFixed ? kLayers * kH : 1], dz_r[kFixed ? kLayers * kH : 1], dout_r[2];
  // Where the MLP's arrays are computed: registers (fixed shape) or the shared-memory row.
  acc_t *xm = kFixed ? x_r : x, *actm = kFixed ? act_r : act;
  acc_t *dzm = kFixed ? dz_r : dz, *doutm = kFixed ? dout_r : dout;
  for (int64_t jid = blockIdx.x; jid < a.njobs; jid += gridDim.x) {
    const Job job = job_at(a, jid);
    const int64_t t = job.t, seg = job.seg, i = job.begin + threadIdx.x, end = a.dev_seg_offsets[seg + 1];
    const bool valid = i < end;
    const acc_t* n = norms + (t * a.nseg + seg) * F;
    Element<scalar_t, acc_t> e;
    if (valid) e.load_and_features(c, a, t, i);
    else for (int k = 0; k < F; ++k) e.f[k] = 0;
    for (int k = 0; k < F; ++k) xm[k] = e.f[k] * n[k];
    acc_t out[2];
    lopt_mlp_forward<1>(w, H, layers, xm, actm, out);
    if constexpr (kFixed) {
      for (int k = 0; k < F; ++k) x[k] = x_r[k];
      for (int k = 0; k < kLayers * kH; ++k) act[k] = act_r[k];
      asm volatile("" ::: "memory");
    }
    const int64_t index = t * a.P + i, plane = a.T * a.P;
    const acc_t gp = valid && a.grad_param_out ? load<acc_t, scalar_t>(a.grad_param_out, index) : acc_t(0);
    const acc_t ex = exp(c.exp_mult * out[1]), dstep = -gp * c.step_mult * ex;
    doutm[0] = dstep;
    doutm[1] = dstep * out[0] * c.exp_mult;
    acc_t dx[F], df[F];
    lopt_mlp_backward<1>(w, H, layers, xm, actm, doutm, dzm, dx);
    if constexpr (kFixed) {
      for (int k = 0; k < kLayers * kH; ++k) dz[k] = dz_r[k];
      dout[0] = dout_r[0];
      dout[1] = dout_r[1];
    }
    for (int k = 0; k < F; ++k) {
      cf[k] = dx[k] * e.f[k];
      df[k] = dx[k] * n[k];
    }
    if (valid) {
      acc_t gs[kLoptStates], dp, dg, ds[kLoptStates];
      if (a.grad_state_out)
        for (int j = 0; j < kLoptStates; ++j) gs[j] = load<acc_t, scalar_t>(a.grad_state_out, j * plane + index);
      lopt_features_backward<1>(c, &e.g, e.s_new, df, a.grad_state_out ? gs : nullptr, &dp, &dg, ds);
      if (a.d_param) store<scalar_t>(a.d_param, index, dp + gp);
      if (a.d_grad) store<scalar_t>(a.d_grad, index, dg);
      if (a.d_state)
        for (int j = 0; j < kLoptStates; ++j) store<scalar_t>(a.d_state, j * plane + index, ds[j]);
    }
    __syncthreads();
    // The job's weight gradient: weight q of layer L is dW[r, k] (or the bias db[r]) summed over elements.
    for (int64_t q = threadIdx.x; q < nw; q += blockDim.x) {
      int layer = 0;
      while (layer < layers && q >= lopt_layer_offset(H, layer + 1)) ++layer;
      const int64_t local = q - lopt_layer_offset(H, layer);
      const int n_in = layer == 0 ? F : H, n_out = layer == layers ? 2 : H;
      const int r = local < n_out * n_in ? static_cast<int>(local / n_in) : static_cast<int>(local - n_out * n_in);
      const int k = local < n_out * n_in ? static_cast<int>(local % n_in) : -1;
      const int in_off = layer == 0 ? 0 : F + (layer - 1) * H;        // x, then act of layer - 1
      const int dz_off = layer == layers ? F + 2 * layers * H : F + layers * H + layer * H;
      // The job's 64 products summed in acc_t (as the CPU kernel's per-job partials), then added to the
      // block's double partial.  NOTE: summed in double, each product was converted first: 1,442
      // conversions per element at hidden = 32, at 16 per clock and SM against 128 FMAs (the CUDA
      // programming guide's throughput table, compute capability 9.0).
      acc_t sum = 0;
      for (int l = 0; l < kJob; ++l) {
        const acc_t* other = smem + l * stride;
        sum += other[dz_off + r] * (k < 0 ? acc_t(1) : other[in_off + k]);
      }
      dw[q] += static_cast<double>(sum);
    }
    if (threadIdx.x < F) {
      double sum = 0;
      for (int l = 0; l < kJob; ++l) sum += static_cast<double>(smem[l * stride + F + 2 * layers * H + 2 + threadIdx.x]);
      c_partial[jid * F + threadIdx.x] = sum;
    }
    __syncthreads();
  }
}

template <typename acc_t>
__global__ void reduce_weights_kernel(int64_t nw, int64_t blocks, const double* dw_partial, acc_t* dw) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= nw) return;
  double sum = 0;
  for (int64_t b = 0; b < blocks; ++b) sum += dw_partial[b * nw + q];
  dw[q] = static_cast<acc_t>(sum);
}

template <typename scalar_t>
__global__ void normaliser_kernel(LoptHyper h, LoptArgs a, const typename AccType<scalar_t>::type* coef) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.P) return;
  const LoptConsts<acc_t> c(h);
  for (int64_t t = blockIdx.y; t < a.T; t += gridDim.y) {
    Element<scalar_t, acc_t> e;
    e.load_and_features(c, a, t, i);
    const acc_t* k_coef = coef + (t * a.nseg + a.seg_ids[i]) * F;
    acc_t df[F], dp, dg, ds[kLoptStates];
    for (int k = 0; k < F; ++k) df[k] = e.f[k] * k_coef[k];
    lopt_features_backward<1>(c, &e.g, e.s_new, df, nullptr, &dp, &dg, ds);
    const int64_t index = t * a.P + i, plane = a.T * a.P;
    if (a.d_param) store<scalar_t>(a.d_param, index, load<acc_t, scalar_t>(a.d_param, index) + dp);
    if (a.d_grad) store<scalar_t>(a.d_grad, index, load<acc_t, scalar_t>(a.d_grad, index) + dg);
    if (a.d_state)
      for (int j = 0; j < kLoptStates; ++j)
        store<scalar_t>(a.d_state, j * plane + index, load<acc_t, scalar_t>(a.d_state, j * plane + index) + ds[j]);
  }
}

// Workspace: job partials of the per-segment sums [njobs, F], the backward's weight partials
// [kBackwardBlocks, nw] (double), and coef [T, nseg, F] (acc_t, padded to 8 bytes).
struct Workspace {
  double* partial;
  double* dw_partial;
  void* coef;
  static int64_t bytes(const LoptArgs& a) {
    return 8 * (a.njobs * F + kBackwardBlocks * lopt_num_weights(a.H, a.layers) + a.T * a.nseg * F);
  }
  Workspace(const LoptArgs& a, void* base)
      : partial(static_cast<double*>(base)),
        dw_partial(partial + a.njobs * F),
        coef(dw_partial + kBackwardBlocks * lopt_num_weights(a.H, a.layers)) {}
};

// Whether the fixed-shape instance for (kH, kLayers) may run: that shape, and weights on a kWeightAlign
// boundary (a view into a larger buffer may not be).
template <int kH, int kLayers>
bool fixed_shape_ok(const LoptArgs& a) {
  return a.H == kH && a.layers == kLayers && reinterpret_cast<uintptr_t>(a.weights) % kWeightAlign == 0;
}

dim3 element_grid(const LoptArgs& a) {
  return dim3(static_cast<unsigned>((a.P + kStepThreads - 1) / kStepThreads),
              static_cast<unsigned>(a.T < kMaxGridY ? a.T : kMaxGridY));
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename scalar_t>
const char* forward_impl(const LoptHyper& h, const LoptArgs& a, void* workspace, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  Workspace ws(a, workspace);
  if (a.njobs > 0) moments_kernel<scalar_t><<<static_cast<unsigned>(a.njobs), kJob, 0, stream>>>(h, a, ws.partial);
  per_segment_kernel<acc_t, false><<<static_cast<unsigned>(a.T * a.nseg), kSegmentThreads, 0, stream>>>(
      h, a, ws.partial, nullptr, static_cast<acc_t*>(a.norms));
  const dim3 grid = element_grid(a);
  if (fixed_shape_ok<32, 2>(a)) step_kernel<scalar_t, 32, 32, 2><<<grid, kStepThreads, 0, stream>>>(h, a);
  else if (fixed_shape_ok<4, 2>(a)) step_kernel<scalar_t, 4, 4, 2><<<grid, kStepThreads, 0, stream>>>(h, a);
  else if (a.H <= 32) step_kernel<scalar_t, 32><<<grid, kStepThreads, 0, stream>>>(h, a);
  else step_kernel<scalar_t, kLoptMaxHidden><<<grid, kStepThreads, 0, stream>>>(h, a);
  return last_error();
}

template <typename scalar_t>
const char* backward_impl(const LoptHyper& h, const LoptArgs& a, void* workspace, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  Workspace ws(a, workspace);
  const int64_t nw = lopt_num_weights(a.H, a.layers);
  const size_t smem = sizeof(acc_t) * kJob * backward_stride(a.H, a.layers);
  cudaError_t err = cudaMemsetAsync(ws.dw_partial, 0, sizeof(double) * kBackwardBlocks * nw, stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int64_t blocks = a.njobs < kBackwardBlocks ? a.njobs : kBackwardBlocks;
  if (blocks > 0) {
    auto kernel = backward_kernel<scalar_t>;
    if (fixed_shape_ok<4, 2>(a)) kernel = backward_kernel<scalar_t, 4, 2>;
    if constexpr (std::is_same<acc_t, float>::value)
      if (fixed_shape_ok<32, 2>(a)) kernel = backward_kernel<scalar_t, 32, 2>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return cudaGetErrorString(err);
    kernel<<<static_cast<unsigned>(blocks), kJob, smem, stream>>>(h, a, ws.dw_partial, ws.partial);
  }
  reduce_weights_kernel<acc_t><<<blocks_for(nw, 256), 256, 0, stream>>>(nw, blocks, ws.dw_partial,
                                                                          static_cast<acc_t*>(a.d_weights));
  if (a.d_param || a.d_grad || a.d_state) {
    acc_t* coef = static_cast<acc_t*>(ws.coef);
    per_segment_kernel<acc_t, true><<<static_cast<unsigned>(a.T * a.nseg), kSegmentThreads, 0, stream>>>(
        h, a, ws.partial, static_cast<const acc_t*>(a.norms), coef);
    normaliser_kernel<scalar_t><<<element_grid(a), kStepThreads, 0, stream>>>(h, a, coef);
  }
  return last_error();
}

}  // namespace

int64_t lopt_cuda_job_size() { return kJob; }

int64_t lopt_cuda_workspace_bytes(DType, const LoptArgs& a) { return Workspace::bytes(a); }

const char* lopt_forward_cuda(DType dtype, const LoptHyper& hyper, const LoptArgs& a, void* workspace, void* stream) {
  const char* err = nullptr;
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto tag) {
    err = forward_impl<decltype(tag)>(hyper, a, workspace, static_cast<cudaStream_t>(stream));
  });
  return err;
}

const char* lopt_backward_cuda(DType dtype, const LoptHyper& hyper, const LoptArgs& a, void* workspace, void* stream) {
  const char* err = nullptr;
  with_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto tag) {
    err = backward_impl<decltype(tag)>(hyper, a, workspace, static_cast<cudaStream_t>(stream));
  });
  return err;
}

}  // namespace mk
