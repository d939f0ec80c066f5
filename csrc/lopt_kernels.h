// Raw-pointer entry points of the fused learned-optimizer step (no torch headers, so nvcc compiles the
// CUDA side alone).  python/lopt_binding.cpp checks and allocates the tensors, then fills LoptArgs.
//
// Layout: param, grad [T, P]; state [4, T, P] (planes m_1, m_2, m_3, v); weights: the flat MLP
// weights of csrc/lopt_math.h in the accumulation dtype; norms [T, nseg, F] in the accumulation
// dtype.  Segment s (one parameter tensor, the unit of feature normalisation) is the index range
// [seg_offsets[s], seg_offsets[s + 1]) of every task's row.
//
// The CUDA kernels also take device tables that the binding builds: seg_ids [P] (int32, the segment of
// each index) and first_job [T * nseg + 1].  Their jobs are runs of at most lopt_cuda_job_size() elements
// that never cross a (task, segment) boundary, numbered in task, segment, index order: the jobs of (t, s)
// are first_job[t * nseg + s] .. first_job[t * nseg + s + 1] - 1, and a kernel finds a job's (t, s) by
// binary search in first_job (no per-job table: built on the host, that was 2.5M rows, 60 MB, and
// 104-115 ms of host time per call at T = 16, P = 1e7).
#pragma once

#include <cstdint>
#include <vector>

#include "lopt_math.h"

namespace mk {

struct LoptArgs {
  int64_t T, P, nseg;
  const int64_t* seg_offsets;  // host, [nseg + 1]
  // CUDA only, device memory:
  const int64_t* dev_seg_offsets;  // [nseg + 1]
  const int32_t* seg_ids;          // [P]
  const int64_t* first_job;        // [T * nseg + 1]
  int64_t njobs;
  int H, layers;
  const void* param;
  const void* grad;
  const void* state;
  const void* weights;
  // Forward outputs; in the backward `norms` is the forward's (an input).
  void* param_out;
  void* state_out;
  void* norms;
  // Backward: output cotangents (nullptr when that output got no gradient) ...
  const void* grad_param_out;
  const void* grad_state_out;
  // ... and input cotangents (nullptr when not requested; d_weights is always written).
  void* d_param;
  void* d_grad;
  void* d_state;
  void* d_weights;
};

// The part of LoptArgs that every call fills from its operands (host pointers; the rest starts null).
inline LoptArgs lopt_args(int64_t T, int64_t P, const std::vector<int64_t>& seg_offsets, int64_t H, int64_t layers,
                          const void* param, const void* grad, const void* state, const void* weights) {
  LoptArgs a{};
  a.T = T;
  a.P = P;
  a.nseg = static_cast<int64_t>(seg_offsets.size()) - 1;
  a.seg_offsets = seg_offsets.data();
  a.H = static_cast<int>(H);
  a.layers = static_cast<int>(layers);
  a.param = param;
  a.grad = grad;
  a.state = state;
  a.weights = weights;
  return a;
}

// The CUDA kernels' first_job table of a.T tasks over a.seg_offsets, jobs of `job` elements (see above);
// its last entry is the number of jobs.
inline std::vector<int64_t> lopt_first_jobs(const LoptArgs& a, int64_t job) {
  std::vector<int64_t> first{0};
  for (int64_t t = 0; t < a.T; ++t)
    for (int64_t s = 0; s < a.nseg; ++s)
      first.push_back(first.back() + (a.seg_offsets[s + 1] - a.seg_offsets[s] + job - 1) / job);
  return first;
}

void lopt_forward_cpu(DType dtype, const LoptHyper& hyper, const LoptArgs& a);
void lopt_backward_cpu(DType dtype, const LoptHyper& hyper, const LoptArgs& a);

// CUDA launchers (csrc/cuda/lopt.cu); `stream` is a cudaStream_t, `workspace` device memory of
// lopt_cuda_workspace_bytes(a) bytes.  Return an error string, or nullptr on success.
int64_t lopt_cuda_job_size();
int64_t lopt_cuda_workspace_bytes(DType dtype, const LoptArgs& a);
const char* lopt_forward_cuda(DType dtype, const LoptHyper& hyper, const LoptArgs& a, void* workspace, void* stream);
const char* lopt_backward_cuda(DType dtype, const LoptHyper& hyper, const LoptArgs& a, void* workspace, void* stream);

}  // namespace mk
