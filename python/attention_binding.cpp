// Bindings of the fused causal attention core's CPU kernels: argument checks, output allocation, and the
// call of the kernel.  metakernels/ops/attention.py validates user input first, calls these on the cpu
// backend (the other backends compose products and the causal softmax's kernels) and wires them into
// autograd; the checks here keep a direct call of _C from crashing the process.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <utility>

#include "../csrc/attention_kernels.h"
#include "common.h"

namespace mk {
namespace {

AttentionArgs base_args(const at::Tensor& qkv, int64_t n_heads, double scale) {
  dtype_code(qkv, "qkv");
  TORCH_CHECK(qkv.device().is_cpu(), "metakernels: the fused attention kernels run on CPU tensors, qkv is on ",
              qkv.device());
  TORCH_CHECK(n_heads > 0, "metakernels: n_heads must be positive, got ", n_heads);
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.size(2) % (3 * n_heads) == 0,
              "metakernels: qkv must be a contiguous [M, S, 3 * n_heads * d] tensor, got ", qkv.sizes());
  AttentionArgs a{};
  a.M = qkv.size(0);
  a.S = qkv.size(1);
  a.H = n_heads;
  a.d = qkv.size(2) / (3 * n_heads);
  a.scale = scale;
  a.qkv = qkv.data_ptr();
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& qkv, int64_t n_heads, double scale) {
  AttentionArgs a = base_args(qkv, n_heads, scale);
  at::Tensor o = new_output(qkv, {a.M, a.S, a.H * a.d});
  at::Tensor p = new_output(qkv, {a.M, a.H, a.S, a.S});
  a.out = o.data_ptr();
  a.out_p = p.data_ptr();
  attention_forward_cpu(dtype_code(qkv, "qkv"), a);
  return {o, p};
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> attention_backward(
    const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& p, int64_t n_heads, double scale,
    bool for_double_backward) {
  AttentionArgs a = base_args(qkv, n_heads, scale);
  check_tensor(dout, "grad_out", qkv, {a.M, a.S, a.H * a.d}, qkv.scalar_type());
  check_tensor(p, "p", qkv, {a.M, a.H, a.S, a.S}, qkv.scalar_type());
  at::Tensor dqkv = new_output(qkv, qkv.sizes());
  std::optional<at::Tensor> g, dz;
  if (for_double_backward) {
    g = new_output(qkv, {a.M, a.H, a.S, a.S});
    dz = new_output(qkv, {a.M, a.H, a.S, a.S});
    a.out_p = g->data_ptr();
    a.out_dz = dz->data_ptr();
  }
  a.dout = dout.data_ptr();
  a.p = p.data_ptr();
  a.out = dqkv.data_ptr();
  attention_backward_cpu(dtype_code(qkv, "qkv"), a);
  return {dqkv, g, dz};
}

std::tuple<at::Tensor, at::Tensor> attention_double_backward(const at::Tensor& grad_grads, const at::Tensor& dout,
                                                             const at::Tensor& qkv, const at::Tensor& p,
                                                             const at::Tensor& g, const at::Tensor& dz, int64_t n_heads,
                                                             double scale) {
  AttentionArgs a = base_args(qkv, n_heads, scale);
  check_tensor(grad_grads, "grad_dqkv", qkv, qkv.sizes(), qkv.scalar_type());
  check_tensor(dout, "grad_out", qkv, {a.M, a.S, a.H * a.d}, qkv.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{p, "p"}, {g, "g"}, {dz, "dz"}})
    check_tensor(t, name, qkv, {a.M, a.H, a.S, a.S}, qkv.scalar_type());
  at::Tensor ddout = new_output(qkv, dout.sizes());
  at::Tensor dqkv = new_output(qkv, qkv.sizes());
  a.grad_grads = grad_grads.data_ptr();
  a.dout = dout.data_ptr();
  a.p = p.data_ptr();
  a.g = g.data_ptr();
  a.dz = dz.data_ptr();
  a.out = dqkv.data_ptr();
  a.out_ddout = ddout.data_ptr();
  attention_double_backward_cpu(dtype_code(qkv, "qkv"), a);
  return {ddout, dqkv};
}

}  // namespace

void register_attention_ops(pybind11::module_& m) {
  m.def("attention_forward", &attention_forward,
        "Fused causal self-attention forward on CPU: (o, P) (see metakernels.ops.attention)", pybind11::arg("qkv"),
        pybind11::arg("n_heads"), pybind11::arg("scale"));
  m.def("attention_backward", &attention_backward,
        "Fused causal self-attention backward on CPU: (dqkv, G, dZ); G and dZ, which only the double backward "
        "reads, are None unless for_double_backward",
        pybind11::arg("grad_out"), pybind11::arg("qkv"), pybind11::arg("p"), pybind11::arg("n_heads"),
        pybind11::arg("scale"), pybind11::arg("for_double_backward"));
  m.def("attention_double_backward", &attention_double_backward,
        "Fused causal self-attention double backward on CPU: (d grad_out, dqkv)", pybind11::arg("grad_dqkv"),
        pybind11::arg("grad_out"), pybind11::arg("qkv"), pybind11::arg("p"), pybind11::arg("g"), pybind11::arg("dz"),
        pybind11::arg("n_heads"), pybind11::arg("scale"));
}

}  // namespace mk
