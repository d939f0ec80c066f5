// Bindings of the fused LayerNorm / RMSNorm kernels: argument checks, output allocation, and the call of
// the CPU or CUDA kernel.  metakernels/ops/norm.py validates user input first and wires these into
// autograd; the checks here keep a direct call of _C from crashing the process.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "../csrc/norm_kernels.h"
#include "common.h"

namespace mk {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Checks x [N, R, D] and w [N, D] and fills the shape part of NormArgs.
NormArgs shape_args(const at::Tensor& x, const at::Tensor& w, bool centered) {
  dtype_code(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "metakernels: x must be a contiguous [N, R, D] tensor, got ",
              x.sizes());
  check_tensor(w, "weight", x, {x.size(0), x.size(2)}, x.scalar_type());
  NormArgs a{};
  a.N = x.size(0);
  a.R = x.size(1);
  a.D = x.size(2);
  a.centered = centered;
  a.x = x.data_ptr();
  a.w = w.data_ptr();
  return a;
}

void check_stats(const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& x) {
  check_tensor(mean, "mean", x, {x.size(0), x.size(1)}, acc_type(x));
  check_tensor(rstd, "rstd", x, {x.size(0), x.size(1)}, acc_type(x));
}

// The CPU and CUDA entry points are template arguments, so that a build without CUDA kernels never
// references the CUDA ones (the lambda that calls them is not emitted there).
template <auto cpu, auto cuda>
void launch(const at::Tensor& x, NormArgs& a) {
  const DType dtype = dtype_code(x, "x");
  launch_kernel(x, "norm", [&] { cpu(dtype, a); }, [&](void* stream) {
    const at::Tensor scratch =
        new_scratch(x, norm_scratch_elems(a.N, a.R, a.D) * static_cast<int64_t>(c10::elementSize(acc_type(x))));
    a.scratch = scratch.data_ptr();
    return cuda(dtype, a, stream);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& w,
                                                            const OptTensor& b, double eps, bool centered) {
  NormArgs a = shape_args(x, w, centered);
  TORCH_CHECK(eps > 0, "metakernels: eps must be > 0, got ", eps);
  if (b) check_tensor(*b, "bias", x, w.sizes(), x.scalar_type());
  at::Tensor y = new_output(x, x.sizes());
  at::Tensor mean = new_output(x.new_empty({0}, acc_type(x)), {a.N, a.R});
  at::Tensor rstd = new_output(mean, {a.N, a.R});
  a.eps = eps;
  a.b = b ? b->data_ptr() : nullptr;
  a.out = y.data_ptr();
  a.mean = mean.data_ptr();
  a.rstd = rstd.data_ptr();
  launch<norm_forward_cpu, norm_forward_cuda>(x, a);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(const at::Tensor& g, const at::Tensor& x,
                                                             const at::Tensor& w, const at::Tensor& mean,
                                                             const at::Tensor& rstd, bool centered) {
  NormArgs a = shape_args(x, w, centered);
  check_tensor(g, "grad_out", x, x.sizes(), x.scalar_type());
  check_stats(mean, rstd, x);
  at::Tensor dx = new_output(x, x.sizes()), dw = new_output(w, w.sizes()), db = new_output(w, w.sizes());
  a.g = g.data_ptr();
  a.mean = const_cast<void*>(mean.data_ptr());
  a.rstd = const_cast<void*>(rstd.data_ptr());
  a.out = dx.data_ptr();
  a.dw = dw.data_ptr();
  a.db = db.data_ptr();
  launch<norm_backward_cpu, norm_backward_cuda>(x, a);
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_double_backward(
    const at::Tensor& ga, const at::Tensor& aw, const OptTensor& ab, const at::Tensor& g, const at::Tensor& x,
    const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd, bool centered) {
  NormArgs a = shape_args(x, w, centered);
  check_tensor(ga, "grad_dx", x, x.sizes(), x.scalar_type());
  check_tensor(aw, "grad_dweight", x, w.sizes(), x.scalar_type());
  if (ab) check_tensor(*ab, "grad_dbias", x, w.sizes(), x.scalar_type());
  const at::Tensor ab_or_zero = ab ? *ab : at::zeros_like(w);  // the kernels always read it
  check_tensor(g, "grad_out", x, x.sizes(), x.scalar_type());
  check_stats(mean, rstd, x);
  at::Tensor dg = new_output(x, x.sizes()), dx = new_output(x, x.sizes()), dw = new_output(w, w.sizes());
  a.a = ga.data_ptr();
  a.aw = aw.data_ptr();
  a.ab = ab_or_zero.data_ptr();
  a.g = g.data_ptr();
  a.mean = const_cast<void*>(mean.data_ptr());
  a.rstd = const_cast<void*>(rstd.data_ptr());
  a.out = dx.data_ptr();
  a.out_g = dg.data_ptr();
  a.dw = dw.data_ptr();
  launch<norm_double_backward_cpu, norm_double_backward_cuda>(x, a);
  return {dg, dx, dw};
}

}  // namespace

void register_norm_ops(pybind11::module_& m) {
  m.def("norm_forward", &norm_forward, "Fused task-batched LayerNorm/RMSNorm forward (see metakernels.ops.norm)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"),
        pybind11::arg("centered"));
  m.def("norm_backward", &norm_backward, "Fused LayerNorm/RMSNorm backward", pybind11::arg("grad_out"),
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("mean"), pybind11::arg("rstd"),
        pybind11::arg("centered"));
  m.def("norm_double_backward", &norm_double_backward, "Fused LayerNorm/RMSNorm double backward",
        pybind11::arg("grad_dx"), pybind11::arg("grad_dweight"), pybind11::arg("grad_dbias"),
        pybind11::arg("grad_out"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("mean"),
        pybind11::arg("rstd"), pybind11::arg("centered"));
}

}  // namespace mk
