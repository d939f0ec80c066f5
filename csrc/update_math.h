// Per-element math of the fused inner-loop update ops, shared by the C++ CPU loop and the CUDA kernel.
//
// Everything here is templated on the accumulation type `acc_t` (float for fp32/bf16/fp16 storage,
// double for fp64) and marked MK_HOST_DEVICE, which is `__host__ __device__` under nvcc and empty for
// the host compiler: the CPU tests therefore exercise the very arithmetic the GPU runs, and only
// indexing and launch code is GPU-only.
//
// Notation, per element (t, i) of a [T, P] problem:
//   p: parameter, g: gradient, s0/s1: optimizer states, lr: learning rate (scalar, [P] or [T, P]).
//   Forward outputs p', s0', s1'.  Backward inputs are the output cotangents gp, gs0, gs1 (zero when
//   an output is unused); backward outputs are the input cotangents dg, ds0, ds1, dlr.  The parameter
//   cotangent is always dp = gp (every update is p' = p - lr * u), so no kernel computes it per task.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__
#else
#define MK_HOST_DEVICE
#endif

namespace mk {

// Which update a kernel runs.  The numeric values are part of the Python <-> C++ contract.
enum class UpdateKind : int { kSgd = 0, kMomentum = 1, kAdam = 2 };

// Storage dtype of every tensor operand of one call (they all share it).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Scalar hyper-parameters.  `lr` is used only when no lr tensor is given.  bias_correction{1,2} are
// 1 - beta^step, computed once on the host in double precision.
struct UpdateHyper {
  double lr;
  double momentum;
  double beta1;
  double beta2;
  double eps;
  double bias_correction1;
  double bias_correction2;
};

// Number of optimizer states each update carries (momentum buffer; Adam's m and v).
MK_HOST_DEVICE constexpr int update_num_states(UpdateKind kind) {
  return kind == UpdateKind::kSgd ? 0 : (kind == UpdateKind::kMomentum ? 1 : 2);
}

template <typename acc_t>
MK_HOST_DEVICE inline acc_t mk_sqrt(acc_t x) {
  return std::sqrt(x);
}

// The hyper-parameters in the accumulation type, with the loop invariants of Adam precomputed once
// per launch: 1/c1 and 1/sqrt(c2).  Kernels build one before their loops.
template <typename acc_t>
struct UpdateConsts {
  acc_t lr, momentum, beta1, beta2, eps, inv_c1, inv_sqrt_c2;
  MK_HOST_DEVICE explicit UpdateConsts(const UpdateHyper& h)
      : lr(static_cast<acc_t>(h.lr)),
        momentum(static_cast<acc_t>(h.momentum)),
        beta1(static_cast<acc_t>(h.beta1)),
        beta2(static_cast<acc_t>(h.beta2)),
        eps(static_cast<acc_t>(h.eps)),
        inv_c1(acc_t(1) / static_cast<acc_t>(h.bias_correction1)),
        inv_sqrt_c2(acc_t(1) / mk_sqrt(static_cast<acc_t>(h.bias_correction2))) {}
};

// SGD:  p' = p - lr * g.
//   Backward:  dg = -lr * gp,  dlr = -g * gp.
template <typename acc_t>
struct SgdMath {
  MK_HOST_DEVICE static void forward(const UpdateConsts<acc_t>&, acc_t lr, acc_t p, acc_t g, const acc_t*,
                                     acc_t& p_new, acc_t*) {
    p_new = p - lr * g;
  }
  MK_HOST_DEVICE static void backward(const UpdateConsts<acc_t>&, acc_t lr, acc_t g, const acc_t*, acc_t gp,
                                      const acc_t*, acc_t& dg, acc_t*, acc_t& dlr) {
    dg = -lr * gp;
    dlr = -g * gp;
  }
};

// Heavy-ball momentum (PyTorch's convention, dampening 0):
//   b' = mu * b + g,   p' = p - lr * b'.
//   Backward with db'_total = gs0 - lr * gp:
//   dg = db'_total,  db = mu * db'_total,  dlr = -b' * gp.
template <typename acc_t>
struct MomentumMath {
  MK_HOST_DEVICE static void forward(const UpdateConsts<acc_t>& c, acc_t lr, acc_t p, acc_t g, const acc_t* s,
                                     acc_t& p_new, acc_t* s_new) {
    const acc_t b_new = c.momentum * s[0] + g;
    s_new[0] = b_new;
    p_new = p - lr * b_new;
  }
  MK_HOST_DEVICE static void backward(const UpdateConsts<acc_t>& c, acc_t lr, acc_t g, const acc_t* s, acc_t gp,
                                      const acc_t* gs, acc_t& dg, acc_t* ds, acc_t& dlr) {
    const acc_t b_new = c.momentum * s[0] + g;
    const acc_t db_total = gs[0] - lr * gp;
    dg = db_total;
    ds[0] = c.momentum * db_total;
    dlr = -b_new * gp;
  }
};

// Adam with bias correction (c1 = 1 - beta1^step, c2 = 1 - beta2^step):
//   m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,
//   d  = sqrt(v') / sqrt(c2) + eps,   u = (m' / c1) / d,   p' = p - lr * u.
//   Backward, with du = -lr * gp:
//   dm'_total = gm + du / (c1 d),
//   dv'_total = gv - du * (m' / c1) / d^2 * r,  r = 1 / (2 sqrt(c2) sqrt(v')) where v' > 0, else 0,
//   dg = (1 - b1) dm'_total + 2 (1 - b2) g dv'_total,  dm = b1 dm'_total,  dv = b2 dv'_total,
//   dlr = -u * gp.
//   The r = 0 convention at v' = 0 (only reachable with g = 0 and v = 0) keeps every cotangent finite;
//   the exact derivative there is infinite and is what turns higher's and TorchOpt's Adam into NaN.
//   With 1/c1 and 1/sqrt(c2) precomputed (UpdateConsts), each element costs one sqrt and one
//   division forward, one sqrt and two divisions backward.
template <typename acc_t>
struct AdamMath {
  MK_HOST_DEVICE static void moments(const UpdateConsts<acc_t>& c, acc_t g, const acc_t* s, acc_t& m_new,
                                     acc_t& v_new) {
    const acc_t b1 = c.beta1, b2 = c.beta2;
    m_new = b1 * s[0] + (acc_t(1) - b1) * g;
    v_new = b2 * s[1] + (acc_t(1) - b2) * g * g;
  }
  MK_HOST_DEVICE static void forward(const UpdateConsts<acc_t>& c, acc_t lr, acc_t p, acc_t g, const acc_t* s,
                                     acc_t& p_new, acc_t* s_new) {
    acc_t m_new, v_new;
    moments(c, g, s, m_new, v_new);
    s_new[0] = m_new;
    s_new[1] = v_new;
    const acc_t d = mk_sqrt(v_new) * c.inv_sqrt_c2 + c.eps;
    p_new = p - lr * (m_new * c.inv_c1) / d;
  }
  MK_HOST_DEVICE static void backward(const UpdateConsts<acc_t>& c, acc_t lr, acc_t g, const acc_t* s, acc_t gp,
                                      const acc_t* gs, acc_t& dg, acc_t* ds, acc_t& dlr) {
    acc_t m_new, v_new;
    moments(c, g, s, m_new, v_new);
    const acc_t sv = mk_sqrt(v_new);
    const acc_t inv_d = acc_t(1) / (sv * c.inv_sqrt_c2 + c.eps);
    const acc_t m_hat = m_new * c.inv_c1;
    const acc_t du = -lr * gp;
    // Selects of computed values, not a branch around the division, so the CPU loop vectorises.
    const bool positive = v_new > acc_t(0);
    const acc_t r = (positive ? acc_t(0.5) * c.inv_sqrt_c2 : acc_t(0)) / (positive ? sv : acc_t(1));
    const acc_t dm_total = gs[0] + du * c.inv_c1 * inv_d;
    const acc_t dv_total = gs[1] - du * m_hat * inv_d * inv_d * r;
    const acc_t b1 = c.beta1, b2 = c.beta2;
    dg = (acc_t(1) - b1) * dm_total + acc_t(2) * (acc_t(1) - b2) * g * dv_total;
    ds[0] = b1 * dm_total;
    ds[1] = b2 * dv_total;
    dlr = -(m_hat * inv_d) * gp;
  }
};

// Accumulation type of a storage type: fp64 stays fp64, every narrower float accumulates in fp32.
template <typename scalar_t> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

template <UpdateKind kind, typename acc_t> struct UpdateMathFor;
template <typename acc_t> struct UpdateMathFor<UpdateKind::kSgd, acc_t> { using type = SgdMath<acc_t>; };
template <typename acc_t> struct UpdateMathFor<UpdateKind::kMomentum, acc_t> { using type = MomentumMath<acc_t>; };
template <typename acc_t> struct UpdateMathFor<UpdateKind::kAdam, acc_t> { using type = AdamMath<acc_t>; };

}  // namespace mk
