// Bindings of the fused bias + GELU kernels: argument checks, output allocation, and the call of the CPU
// or CUDA kernel.  metakernels/ops/gelu.py validates user input first and wires these into autograd.
#include <torch/extension.h>

#include <tuple>

#include "../csrc/gelu_kernels.h"
#include "common.h"

namespace mk {
namespace {

GeluArgs base_args(const at::Tensor& x, const at::Tensor& b, bool tanh_form) {
  dtype_code(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "metakernels: x must be a contiguous [N, R, C] tensor, got ",
              x.sizes());
  check_tensor(b, "bias", x, {x.size(0), x.size(2)}, x.scalar_type());
  GeluArgs a{};
  a.N = x.size(0);
  a.R = x.size(1);
  a.C = x.size(2);
  a.tanh_form = tanh_form;
  a.x = x.data_ptr();
  a.b = b.data_ptr();
  return a;
}

void launch(GeluPass pass, const at::Tensor& x, const GeluArgs& a) {
  const DType dtype = dtype_code(x, "x");
  launch_kernel(x, "gelu", [&] { gelu_cpu(pass, dtype, a); },
                [&](void* stream) { return gelu_cuda(pass, dtype, a, stream); });
}

at::Tensor gelu_forward(const at::Tensor& x, const at::Tensor& b, bool tanh_form) {
  GeluArgs a = base_args(x, b, tanh_form);
  at::Tensor y = new_output(x, x.sizes());
  a.out = y.data_ptr();
  launch(GeluPass::kForward, x, a);
  return y;
}

at::Tensor gelu_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& b, bool tanh_form) {
  GeluArgs a = base_args(x, b, tanh_form);
  check_tensor(g, "grad_out", x, x.sizes(), x.scalar_type());
  at::Tensor dx = new_output(x, x.sizes());
  a.g = g.data_ptr();
  a.out = dx.data_ptr();
  launch(GeluPass::kBackward, x, a);
  return dx;
}

std::tuple<at::Tensor, at::Tensor> gelu_double_backward(const at::Tensor& ga, const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& b, bool tanh_form) {
  GeluArgs a = base_args(x, b, tanh_form);
  check_tensor(ga, "grad_dx", x, x.sizes(), x.scalar_type());
  check_tensor(g, "grad_out", x, x.sizes(), x.scalar_type());
  at::Tensor dg = new_output(x, x.sizes()), du = new_output(x, x.sizes());
  a.a = ga.data_ptr();
  a.g = g.data_ptr();
  a.out = du.data_ptr();
  a.out_g = dg.data_ptr();
  launch(GeluPass::kDoubleBackward, x, a);
  return {dg, du};
}

}  // namespace

void register_gelu_ops(pybind11::module_& m) {
  m.def("gelu_forward", &gelu_forward, "Fused task-batched bias + GELU forward (see metakernels.ops.gelu)",
        pybind11::arg("x"), pybind11::arg("bias"), pybind11::arg("tanh_form"));
  m.def("gelu_backward", &gelu_backward, "Fused bias + GELU backward", pybind11::arg("grad_out"), pybind11::arg("x"),
        pybind11::arg("bias"), pybind11::arg("tanh_form"));
  m.def("gelu_double_backward", &gelu_double_backward, "Fused bias + GELU double backward",
        pybind11::arg("grad_dx"), pybind11::arg("grad_out"), pybind11::arg("x"),
        pybind11::arg("bias"), pybind11::arg("tanh_form"));
}

}  // namespace mk
