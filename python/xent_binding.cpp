// Bindings of the vocabulary head's cross-entropy row kernels: argument checks, output allocation, and the
// call of the CPU or CUDA kernel.  metakernels/ops/vocab_head.py validates user input first and calls these
// through metakernels/ops/xent.py; the checks here keep a direct call of _C from crashing the process.
#include <torch/extension.h>

#include "../csrc/xent_kernels.h"
#include "common.h"

namespace mk {
namespace {

// The [M, V] layout of z (any shape, contiguous, rows along its last dimension).
XentArgs base_args(const at::Tensor& z) {
  dtype_code(z, "z");
  TORCH_CHECK(z.dim() >= 1 && z.size(-1) >= 1 && z.is_contiguous(), "metakernels: z must be a contiguous tensor "
              "of rows [..., V] with V >= 1, got shape ", z.sizes(), z.is_contiguous() ? "" : " (not contiguous)");
  XentArgs a{};
  a.V = z.size(-1);
  a.M = z.numel() / a.V;
  a.z = z.data_ptr();
  return a;
}

// lse, c: [M] of z's dtype; y: [M] int64 targets in [0, V).
void row_operands(XentArgs& a, const at::Tensor& z, const at::Tensor& lse, const at::Tensor& y, const at::Tensor& c) {
  check_tensor(lse, "lse", z, {a.M}, z.scalar_type());
  check_tensor(c, "c", z, {a.M}, z.scalar_type());
  check_tensor(y, "y", z, {a.M}, at::kLong);
  if (a.M > 0) {
    const auto [lo, hi] = at::aminmax(y);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < a.V, "metakernels: y holds targets ",
                lo.item<int64_t>(), "..", hi.item<int64_t>(), ", outside [0, ", a.V, ")");
  }
  a.lse = lse.data_ptr();
  a.y = y.data_ptr<int64_t>();
  a.c = c.data_ptr();
}

void launch(XentPass pass, const at::Tensor& z, const XentArgs& a) {
  const DType dtype = dtype_code(z, "z");
  launch_kernel(z, "xent", [&] { xent_cpu(pass, dtype, a); }, [&](void* stream) { return xent_cuda(pass, dtype, a, stream); });
}

at::Tensor xent_forward(const at::Tensor& z) {
  XentArgs a = base_args(z);
  at::Tensor lse = new_output(z, {a.M});
  a.out = lse.data_ptr();
  launch(XentPass::kForward, z, a);
  return lse;
}

at::Tensor xent_backward_(at::Tensor z, const at::Tensor& lse, const at::Tensor& y, const at::Tensor& c) {
  XentArgs a = base_args(z);
  row_operands(a, z, lse, y, c);
  launch(XentPass::kBackward, z, a);
  return z;
}

at::Tensor xent_double_backward_(at::Tensor z, at::Tensor u, const at::Tensor& lse, const at::Tensor& y,
                                 const at::Tensor& c) {
  XentArgs a = base_args(z);
  check_tensor(u, "u", z, z.sizes(), z.scalar_type());
  row_operands(a, z, lse, y, c);
  TORCH_CHECK(!z.is_same(u) && (a.M == 0 || z.data_ptr() != u.data_ptr()), "metakernels: z and u must be distinct buffers");
  at::Tensor r = new_output(z, {a.M});
  a.u = u.data_ptr();
  a.out = r.data_ptr();
  launch(XentPass::kDoubleBackward, z, a);
  return r;
}

}  // namespace

void register_xent_ops(pybind11::module_& m) {
  m.def("xent_forward", &xent_forward, "Per-row logsumexp of logits [..., V] (see metakernels.ops.xent)",
        pybind11::arg("z"));
  m.def("xent_backward_", &xent_backward_, "In place: z <- c (softmax(z) - onehot(y)) per row", pybind11::arg("z"),
        pybind11::arg("lse"), pybind11::arg("y"), pybind11::arg("c"));
  m.def("xent_double_backward_", &xent_double_backward_,
        "In place: u <- c (u - <p, u>) p, z <- c (p - onehot(y)); returns <p, u> - u_y per row", pybind11::arg("z"),
        pybind11::arg("u"), pybind11::arg("lse"), pybind11::arg("y"), pybind11::arg("c"));
}

}  // namespace mk
