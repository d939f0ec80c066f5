// The CUDA learned-optimizer kernels (csrc/cuda/lopt.cu, built for the CPU by emulate.py) on CPU tensors:
// forward(...) and backward(...) with the arguments and results of metakernels._C.lopt_forward /
// lopt_backward.  The caller passes valid operands (the tests do); the tables are those that
// python/lopt_binding.cpp builds on the device.
#include <torch/extension.h>

#include <optional>
#include <stdexcept>
#include <vector>

#include "lopt_kernels.h"

namespace {

using mk::LoptArgs;
using OptTensor = std::optional<at::Tensor>;

mk::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mk::DType::kFloat32;
    case at::kDouble: return mk::DType::kFloat64;
    case at::kBFloat16: return mk::DType::kBFloat16;
    case at::kHalf: return mk::DType::kFloat16;
    default: throw std::invalid_argument("unsupported dtype");
  }
}

// The operands of both passes and the kernels' tables, kept alive with the arguments that point into them.
struct Call {
  LoptArgs a;
  mk::LoptHyper hyper;
  at::Tensor offsets, first, seg_ids;

  Call(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state, const at::Tensor& weights,
       const std::vector<int64_t>& seg_offsets, int64_t H, int64_t layers, const std::vector<double>& h)
      : a(mk::lopt_args(param.size(0), param.size(1), seg_offsets, H, layers, param.data_ptr(), grad.data_ptr(),
                        state.data_ptr(), weights.data_ptr())),
        hyper{{h[0], h[1], h[2]}, h[3], h[4], h[5], h[6], h[7]} {
    const std::vector<int64_t> first_job = mk::lopt_first_jobs(a, mk::lopt_cuda_job_size());
    std::vector<int32_t> ids;
    for (int64_t s = 0; s < a.nseg; ++s) ids.insert(ids.end(), seg_offsets[s + 1] - seg_offsets[s], static_cast<int32_t>(s));
    offsets = torch::tensor(seg_offsets, torch::kLong);
    first = torch::tensor(first_job, torch::kLong);
    seg_ids = torch::tensor(ids, torch::kInt);
    a.dev_seg_offsets = offsets.data_ptr<int64_t>();
    a.first_job = first.data_ptr<int64_t>();
    a.seg_ids = seg_ids.data_ptr<int32_t>();
    a.njobs = first_job.back();
  }

  template <typename Launcher>
  void run(const at::Tensor& param, Launcher launcher) {
    at::Tensor workspace = at::full({mk::lopt_cuda_workspace_bytes(dtype_of(param), a)}, 0xff, at::kByte);
    const char* err = launcher(dtype_of(param), hyper, a, workspace.data_ptr(), nullptr);
    TORCH_CHECK(err == nullptr, err);
  }
};

// Outputs start as NaN, so that an element a kernel fails to write cannot pass with a right stale value.
at::Tensor poisoned(const at::Tensor& like) { return at::full_like(like, std::numeric_limits<double>::quiet_NaN()); }

std::vector<at::Tensor> forward(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                                const at::Tensor& weights, const std::vector<int64_t>& seg_offsets, int64_t H,
                                int64_t layers, const std::vector<double>& hyper, bool in_place) {
  Call call(param, grad, state, weights, seg_offsets, H, layers, hyper);
  std::vector<at::Tensor> outs{in_place ? param : poisoned(param), in_place ? state : poisoned(state),
                               at::full({call.a.T, call.a.nseg, mk::kLoptFeatures}, NAN, weights.options())};
  call.a.param_out = outs[0].data_ptr();
  call.a.state_out = outs[1].data_ptr();
  call.a.norms = outs[2].data_ptr();
  call.run(param, mk::lopt_forward_cuda);
  return outs;
}

std::vector<OptTensor> backward(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                                const at::Tensor& weights, const at::Tensor& norms,
                                const std::vector<int64_t>& seg_offsets, int64_t H, int64_t layers,
                                const std::vector<double>& hyper, const OptTensor& grad_param_out,
                                const OptTensor& grad_state_out, const std::vector<bool>& needs_grad) {
  Call call(param, grad, state, weights, seg_offsets, H, layers, hyper);
  call.a.norms = norms.data_ptr();
  call.a.grad_param_out = grad_param_out ? grad_param_out->data_ptr() : nullptr;
  call.a.grad_state_out = grad_state_out ? grad_state_out->data_ptr() : nullptr;
  std::vector<OptTensor> result(4);
  const at::Tensor* likes[3] = {&param, &grad, &state};
  void** targets[3] = {&call.a.d_param, &call.a.d_grad, &call.a.d_state};
  for (int k = 0; k < 3; ++k) {
    if (!needs_grad[k]) continue;
    result[k] = poisoned(*likes[k]);
    *targets[k] = result[k]->data_ptr();
  }
  result[3] = poisoned(weights);
  call.a.d_weights = result[3]->data_ptr();
  call.run(param, mk::lopt_backward_cuda);
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lopt_forward", &forward, pybind11::arg("param"), pybind11::arg("grad"), pybind11::arg("state"),
        pybind11::arg("weights"), pybind11::arg("seg_offsets"), pybind11::arg("hidden"), pybind11::arg("layers"),
        pybind11::arg("hyper"), pybind11::arg("in_place") = false);
  m.def("lopt_backward", &backward);
}
