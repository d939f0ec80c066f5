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

// SGD:  p' = p - lr * g.
//   Backward:  dg = -lr * gp,  dlr = -g * gp.
template <typename acc_t>
struct SgdMath {
  MK_HOST_DEVICE static void forward(const UpdateHyper&, acc_t lr, acc_t p, acc_t g, const acc_t*,
                                     acc_t& p_new, acc_t*) {
    p_new = p - lr * g;
  }
  MK_HOST_DEVICE static void backward(const UpdateHyper&, acc_t lr, acc_t g, const acc_t*, acc_t gp,
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
  MK_HOST_DEVICE static void forward(const UpdateHyper& h, acc_t lr, acc_t p, acc_t g, const acc_t* s,
                                     acc_t& p_new, acc_t* s_new) {
    const acc_t b_new = static_cast<acc_t>(h.momentum) * s[0] + g;
    s_new[0] = b_new;
    p_new = p - lr * b_new;
  }
  MK_HOST_DEVICE static void backward(const UpdateHyper& h, acc_t lr, acc_t g, const acc_t* s, acc_t gp,
                                      const acc_t* gs, acc_t& dg, acc_t* ds, acc_t& dlr) {
    const acc_t b_new = static_cast<acc_t>(h.momentum) * s[0] + g;
    const acc_t db_total = gs[0] - lr * gp;
    dg = db_total;
    ds[0] = static_cast<acc_t>(h.momentum) * db_total;
    dlr = -b_new * gp;
  }
};

// Adam with bias correction (c1 = 1 - beta1^step, c2 = 1 - beta2^step):
//   m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,
//   u  = (m' / c1) / (sqrt(v' / c2) + eps),   p' = p - lr * u.
//   Backward, with du = -lr * gp and d = sqrt(v' / c2) + eps:
//   dm'_total = gm + du / (c1 d),
//   dv'_total = gv - du * (m' / c1) / d^2 * r,  r = 1 / (2 sqrt(v' c2)) where v' > 0, else 0,
//   dg = (1 - b1) dm'_total + 2 (1 - b2) g dv'_total,  dm = b1 dm'_total,  dv = b2 dv'_total,
//   dlr = -u * gp.
//   The r = 0 convention at v' = 0 (only reachable with g = 0 and v = 0) keeps every cotangent finite;
//   the exact derivative there is infinite and is what turns higher's and TorchOpt's Adam into NaN.
template <typename acc_t>
struct AdamMath {
  MK_HOST_DEVICE static void moments(const UpdateHyper& h, acc_t g, const acc_t* s, acc_t& m_new,
                                     acc_t& v_new) {
    const acc_t b1 = static_cast<acc_t>(h.beta1), b2 = static_cast<acc_t>(h.beta2);
    m_new = b1 * s[0] + (acc_t(1) - b1) * g;
    v_new = b2 * s[1] + (acc_t(1) - b2) * g * g;
  }
  MK_HOST_DEVICE static acc_t denom(const UpdateHyper& h, acc_t v_new) {
    return mk_sqrt(v_new / static_cast<acc_t>(h.bias_correction2)) + static_cast<acc_t>(h.eps);
  }
  MK_HOST_DEVICE static void forward(const UpdateHyper& h, acc_t lr, acc_t p, acc_t g, const acc_t* s,
                                     acc_t& p_new, acc_t* s_new) {
    acc_t m_new, v_new;
    moments(h, g, s, m_new, v_new);
    s_new[0] = m_new;
    s_new[1] = v_new;
    p_new = p - lr * (m_new / static_cast<acc_t>(h.bias_correction1)) / denom(h, v_new);
  }
  MK_HOST_DEVICE static void backward(const UpdateHyper& h, acc_t lr, acc_t g, const acc_t* s, acc_t gp,
                                      const acc_t* gs, acc_t& dg, acc_t* ds, acc_t& dlr) {
    acc_t m_new, v_new;
    moments(h, g, s, m_new, v_new);
    const acc_t c1 = static_cast<acc_t>(h.bias_correction1), c2 = static_cast<acc_t>(h.bias_correction2);
    const acc_t d = denom(h, v_new);
    const acc_t m_hat = m_new / c1;
    const acc_t du = -lr * gp;
    const acc_t r = v_new > acc_t(0) ? acc_t(1) / (acc_t(2) * mk_sqrt(v_new * c2)) : acc_t(0);
    const acc_t dm_total = gs[0] + du / (c1 * d);
    const acc_t dv_total = gs[1] - du * m_hat / (d * d) * r;
    const acc_t b1 = static_cast<acc_t>(h.beta1), b2 = static_cast<acc_t>(h.beta2);
    dg = (acc_t(1) - b1) * dm_total + acc_t(2) * (acc_t(1) - b2) * g * dv_total;
    ds[0] = b1 * dm_total;
    ds[1] = b2 * dv_total;
    dlr = -(m_hat / d) * gp;
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
