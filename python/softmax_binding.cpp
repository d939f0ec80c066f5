// Bindings of the fused causal softmax kernels: argument checks, output allocation, and the call of the
// CPU or CUDA kernel.  metakernels/ops/softmax.py validates user input first and wires these into
// autograd; the checks here keep a direct call of _C from crashing the process.
#include <torch/extension.h>

#include <tuple>

#include "../csrc/softmax_kernels.h"
#include "common.h"

namespace mk {
namespace {

SoftmaxArgs base_args(const at::Tensor& ref, const char* name, double scale) {
  dtype_code(ref, name);
  TORCH_CHECK(ref.dim() == 3 && ref.is_contiguous(), "metakernels: ", name,
              " must be a contiguous [N, S_q, S_k] tensor, got ", ref.sizes());
  TORCH_CHECK(ref.size(2) >= ref.size(1), "metakernels: ", name, " has S_k=", ref.size(2), " < S_q=", ref.size(1));
  SoftmaxArgs a{};
  a.N = ref.size(0);
  a.Sq = ref.size(1);
  a.Sk = ref.size(2);
  a.scale = scale;
  return a;
}

void launch(SoftmaxPass pass, const at::Tensor& ref, const SoftmaxArgs& a) {
  const DType dtype = dtype_code(ref, "scores");
  launch_kernel(ref, "softmax", [&] { softmax_cpu(pass, dtype, a); },
                [&](void* stream) { return softmax_cuda(pass, dtype, a, stream); });
}

at::Tensor softmax_forward(const at::Tensor& s, double scale) {
  SoftmaxArgs a = base_args(s, "scores", scale);
  at::Tensor p = new_output(s, s.sizes());
  a.s = s.data_ptr();
  a.out = p.data_ptr();
  launch(SoftmaxPass::kForward, s, a);
  return p;
}

at::Tensor softmax_backward(const at::Tensor& g, const at::Tensor& p, double scale) {
  SoftmaxArgs a = base_args(p, "p", scale);
  check_tensor(g, "grad_out", p, p.sizes(), p.scalar_type());
  at::Tensor ds = new_output(p, p.sizes());
  a.p = p.data_ptr();
  a.g = g.data_ptr();
  a.out = ds.data_ptr();
  launch(SoftmaxPass::kBackward, p, a);
  return ds;
}

std::tuple<at::Tensor, at::Tensor> softmax_double_backward(const at::Tensor& ga, const at::Tensor& g,
                                                           const at::Tensor& p, double scale) {
  SoftmaxArgs a = base_args(p, "p", scale);
  check_tensor(ga, "grad_ds", p, p.sizes(), p.scalar_type());
  check_tensor(g, "grad_out", p, p.sizes(), p.scalar_type());
  at::Tensor dg = new_output(p, p.sizes()), dp = new_output(p, p.sizes());
  a.p = p.data_ptr();
  a.g = g.data_ptr();
  a.a = ga.data_ptr();
  a.out = dg.data_ptr();
  a.out2 = dp.data_ptr();
  launch(SoftmaxPass::kDoubleBackward, p, a);
  return {dg, dp};
}

}  // namespace

void register_softmax_ops(pybind11::module_& m) {
  m.def("softmax_forward", &softmax_forward, "Fused causal softmax forward (see metakernels.ops.softmax)",
        pybind11::arg("scores"), pybind11::arg("scale"));
  m.def("softmax_backward", &softmax_backward, "Fused causal softmax backward", pybind11::arg("grad_out"),
        pybind11::arg("p"), pybind11::arg("scale"));
  m.def("softmax_double_backward", &softmax_double_backward, "Fused causal softmax double backward",
        pybind11::arg("grad_ds"), pybind11::arg("grad_out"), pybind11::arg("p"), pybind11::arg("scale"));
}

}  // namespace mk
