// The fused causal self-attention core on the CPU: forward, backward and double backward, one kernel each
// (metakernels/ops/attention.py has the derivation and, for the other backends, the composition of batched
// products and the causal softmax's kernels).
//
// Layout: qkv is a contiguous [M, S, 3 D] fused projection, q | k | v along the last dimension, each with
// H heads of d = D / H contiguous features; o and do are [M, S, D] (heads merged); P, G and dZ are
// [M, H, S, S].  Per sequence m and head h, with q, k, v, do [S, d], query i seeing keys j <= i:
//   forward    P = causal_softmax(scale q k^T),  o = P v
//   backward   G = do v^T,  c_i = sum_j P_ij G_ij,  dZ = scale P (G - c),
//              dq = dZ k,  dk = dZ^T q,  dv = P^T do
//   double     for cotangents (aq, ak, av) of (dq, dk, dv): A = aq k^T + q ak^T, with <X>_i = sum_j P_ij X_ij,
//   backward   dG = scale P (A - <A>),  dP = scale (A (G - <G>) - <A> G) + do av^T,  dZp = scale P (dP - <dP>),
//              d(do) = P av + dG v,  dq = dZ ak + dZp k,  dk = dZ^T aq + dZp^T q,  dv = dG^T do
// G is written only where P can be non-zero (j <= i) and 0 above the diagonal: every use of it is
// multiplied by P.
#pragma once

#include <cstdint>

#include "update_math.h"  // DType

namespace mk {

struct AttentionArgs {
  int64_t M, S, H, d;  // sequences, positions, heads, features per head
  double scale;
  const void* qkv;
  const void* p;           // backward, double backward: the forward's attention weights
  const void* dout;        // backward, double backward: the cotangent of o
  const void* g;           // double backward: the backward's G
  const void* dz;          // double backward: the backward's dZ
  const void* grad_grads;  // double backward: the cotangent of dqkv, [M, S, 3 D]
  void* out;               // forward: o; backward, double backward: dqkv
  void* out_p;             // forward: P; backward: G (nullptr: not stored)
  void* out_dz;            // backward: dZ (nullptr: not stored)
  void* out_ddout;         // double backward: the cotangent of do
};

void attention_forward_cpu(DType dtype, const AttentionArgs& a);
void attention_backward_cpu(DType dtype, const AttentionArgs& a);
void attention_double_backward_cpu(DType dtype, const AttentionArgs& a);

}  // namespace mk
