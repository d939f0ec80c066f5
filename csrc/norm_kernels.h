// Raw-pointer entry points of the fused LayerNorm / RMSNorm kernels (no torch headers, so nvcc compiles
// the CUDA side alone).  python/norm_binding.cpp checks and allocates tensors, then fills NormArgs.
//
// Layout: x, g, a and the per-element outputs are contiguous [N, R, D] (N tasks of R rows);
// w, b, aw, ab, dw, db are [N, D]; mean and rstd are [N, R] in the accumulation type (float, or double
// for float64 storage).  b may be nullptr (no bias); ab may not (zeros when db has no cotangent); for RMSNorm
// (centered = false) the forward writes mean = 0.
#pragma once

#include <cstdint>

#include "norm_math.h"

namespace mk {

struct NormArgs {
  int64_t N, R, D;
  bool centered;
  double eps;
  const void* x;
  const void* w;
  const void* b;
  const void* g;     // backward, double backward: the cotangent of y
  const void* a;     // double backward: cotangents of dx, dw, db
  const void* aw;
  const void* ab;
  void* mean;        // forward writes them; backward and double backward read them
  void* rstd;
  void* out;         // forward: y; backward: dx; double backward: dx
  void* out_g;       // double backward: dg
  void* dw;          // backward, double backward
  void* db;          // backward
  void* scratch;     // CUDA: [N * nchunks * D * 2 + N * R * 2] accumulation-type elements (norm_scratch_elems)
};

// Rows per chunk of the deterministic sum over rows of the weight cotangents (partials per chunk, then
// the chunks summed in order): part of the contract, so that every backend adds in the same grouping.
constexpr int64_t kNormRowsPerChunk = 32;

inline int64_t norm_chunks(int64_t R) { return (R + kNormRowsPerChunk - 1) / kNormRowsPerChunk; }
inline int64_t norm_scratch_elems(int64_t N, int64_t R, int64_t D) { return N * norm_chunks(R) * D * 2 + N * R * 2; }

void norm_forward_cpu(DType dtype, const NormArgs& a);
void norm_backward_cpu(DType dtype, const NormArgs& a);
void norm_double_backward_cpu(DType dtype, const NormArgs& a);

// CUDA launchers (csrc/cuda/norm.cu); `stream` is a cudaStream_t.  A CUDA error string, or nullptr.
const char* norm_forward_cuda(DType dtype, const NormArgs& a, void* stream);
const char* norm_backward_cuda(DType dtype, const NormArgs& a, void* stream);
const char* norm_double_backward_cuda(DType dtype, const NormArgs& a, void* stream);

}  // namespace mk
