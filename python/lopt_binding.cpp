// Bindings of the fused learned-optimizer step: argument checks, output allocation, and the call of the
// CPU or CUDA kernel.  metakernels/ops/learned_update.py validates user input first and wires these
// into autograd; the checks here keep a direct call of _C from crashing the process.
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "../csrc/lopt_kernels.h"
#include "common.h"

namespace mk {
namespace {

using OptTensor = std::optional<at::Tensor>;

LoptHyper make_hyper(const std::vector<double>& h) {
  TORCH_CHECK(h.size() == 8, "metakernels: expected 8 learned-optimizer hyper-parameters, got ", h.size());
  return LoptHyper{{h[0], h[1], h[2]}, h[3], h[4], h[5], h[6], h[7]};
}

// Checks the operands shared by forward and backward and fills the common part of LoptArgs.
LoptArgs common_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                     const at::Tensor& weights, const std::vector<int64_t>& seg_offsets, int64_t H, int64_t layers) {
  dtype_code(param, "params");
  TORCH_CHECK(param.dim() == 2 && param.is_contiguous(), "metakernels: params must be a contiguous [T, P] tensor, got ",
              param.sizes());
  const int64_t T = param.size(0), P = param.size(1);
  TORCH_CHECK(grad.sizes() == param.sizes() && grad.is_contiguous() && grad.scalar_type() == param.scalar_type() &&
                  grad.device() == param.device(),
              "metakernels: grads must be a contiguous tensor like params ", param.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(state.dim() == 3 && state.size(0) == kLoptStates && state.size(1) == T && state.size(2) == P &&
                  state.is_contiguous() && state.scalar_type() == param.scalar_type() && state.device() == param.device(),
              "metakernels: state must be a contiguous [4, ", T, ", ", P, "] tensor like params, got ", state.sizes());
  TORCH_CHECK(H >= 1 && H <= kLoptMaxHidden && layers >= 1 && layers <= kLoptMaxLayers,
              "metakernels: hidden must be in [1, ", kLoptMaxHidden, "] and layers in [1, ", kLoptMaxLayers, "]");
  TORCH_CHECK(weights.dim() == 1 && weights.numel() == lopt_num_weights(H, layers) && weights.is_contiguous() &&
                  weights.scalar_type() == acc_type(param) && weights.device() == param.device(),
              "metakernels: weights must be a contiguous [", lopt_num_weights(H, layers), "] ", acc_type(param),
              " tensor on ", param.device(), ", got ", weights.sizes(), " ", weights.scalar_type());
  TORCH_CHECK(!seg_offsets.empty() && seg_offsets.front() == 0 && seg_offsets.back() == P,
              "metakernels: segment offsets must run from 0 to P = ", P);
  for (size_t s = 1; s < seg_offsets.size(); ++s)
    TORCH_CHECK(seg_offsets[s] > seg_offsets[s - 1], "metakernels: segment offsets must increase strictly");
  return lopt_args(T, P, seg_offsets, H, layers, param.data_ptr(), grad.data_ptr(), state.data_ptr(),
                   weights.data_ptr());
}

// The CPU and CUDA entry points are template arguments, so that a build without CUDA kernels never
// references the CUDA ones (the lambda that calls them is not emitted there).
template <auto cpu, auto cuda>
void launch(const at::Tensor& ref, const std::vector<int64_t>& seg_offsets, LoptArgs& a, const LoptHyper& hyper) {
  const DType dtype = dtype_code(ref, "params");
  launch_kernel(ref, "learned-optimizer", [&] { cpu(dtype, hyper, a); }, [&](void* stream) {
    // The CUDA kernels' index tables (see csrc/lopt_kernels.h): O(T * nseg) on the host, sent without
    // waiting for the copy (pinned memory), each element's segment expanded on the device.  (Under
    // tests/cuda_emulation the device is the host, where there is nothing to pin.)
    const std::vector<int64_t> first = lopt_first_jobs(a, lopt_cuda_job_size());
    const auto on_device = [&](const std::vector<int64_t>& values) {
      const at::Tensor host = at::tensor(values, at::TensorOptions().dtype(at::kLong));
      return ref.is_cuda() ? host.pin_memory().to(ref.device(), at::kLong, /*non_blocking=*/true) : host;
    };
    const at::Tensor dev_offsets = on_device(seg_offsets), dev_first = on_device(first);
    // NOTE: built on the host, this [P] table was filled, copied and sent to the device on every call:
    // 40 MB at P = 1e7.
    const at::Tensor seg_ids = at::repeat_interleave(at::arange(a.nseg, dev_offsets.options().dtype(at::kInt)),
                                                     dev_offsets.slice(0, 1) - dev_offsets.slice(0, 0, -1), 0, a.P);
    a.seg_ids = seg_ids.data_ptr<int32_t>();
    a.dev_seg_offsets = dev_offsets.data_ptr<int64_t>();
    a.first_job = dev_first.data_ptr<int64_t>();
    a.njobs = first.back();
    const at::Tensor workspace = new_scratch(ref, lopt_cuda_workspace_bytes(dtype, a));
    return cuda(dtype, hyper, a, workspace.data_ptr(), stream);
  });
}

// Returns (params', state', norms).  in_place: params' and state' are written over params and state (each
// element is read before it is written, and no pass reads them after the one that writes them).
std::vector<at::Tensor> lopt_forward(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                                     const at::Tensor& weights, const std::vector<int64_t>& seg_offsets, int64_t H,
                                     int64_t layers, const std::vector<double>& hyper, bool in_place) {
  LoptArgs a = common_args(param, grad, state, weights, seg_offsets, H, layers);
  std::vector<at::Tensor> outs{in_place ? param : new_output(param, param.sizes()),
                               in_place ? state : new_output(state, state.sizes()),
                               new_output(weights, {a.T, a.nseg, kLoptFeatures})};
  a.param_out = outs[0].data_ptr();
  a.state_out = outs[1].data_ptr();
  a.norms = outs[2].data_ptr();
  launch<lopt_forward_cpu, lopt_forward_cuda>(param, seg_offsets, a, make_hyper(hyper));
  return outs;
}

// Returns the cotangents of (params, grads, state, weights); the first three are None when not requested.
std::vector<OptTensor> lopt_backward(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state,
                                     const at::Tensor& weights, const at::Tensor& norms,
                                     const std::vector<int64_t>& seg_offsets, int64_t H, int64_t layers,
                                     const std::vector<double>& hyper, const OptTensor& grad_param_out,
                                     const OptTensor& grad_state_out, const std::vector<bool>& needs_grad) {
  LoptArgs a = common_args(param, grad, state, weights, seg_offsets, H, layers);
  TORCH_CHECK(needs_grad.size() == 3, "metakernels: needs_grad must have 3 entries (params, grads, state)");
  TORCH_CHECK(norms.sizes() == at::IntArrayRef({a.T, a.nseg, kLoptFeatures}) && norms.is_contiguous() &&
                  norms.scalar_type() == weights.scalar_type() && norms.device() == param.device(),
              "metakernels: norms must be the forward's contiguous [T, nseg, 9] tensor, got ", norms.sizes());
  const auto check_cot = [&](const OptTensor& t, const at::Tensor& like, const char* name) {
    if (!t) return;
    TORCH_CHECK(t->sizes() == like.sizes() && t->is_contiguous() && t->scalar_type() == like.scalar_type() &&
                    t->device() == like.device(),
                name, " must be a contiguous tensor like the forward's output ", like.sizes(), ", got ", t->sizes());
  };
  check_cot(grad_param_out, param, "metakernels: the cotangent of params'");
  check_cot(grad_state_out, state, "metakernels: the cotangent of state'");
  a.norms = const_cast<void*>(norms.data_ptr());
  a.grad_param_out = grad_param_out ? grad_param_out->data_ptr() : nullptr;
  a.grad_state_out = grad_state_out ? grad_state_out->data_ptr() : nullptr;
  std::vector<OptTensor> result(4);
  const at::Tensor* likes[3] = {&param, &grad, &state};
  void** targets[3] = {&a.d_param, &a.d_grad, &a.d_state};
  for (int k = 0; k < 3; ++k) {
    if (!needs_grad[k]) continue;
    result[k] = new_output(*likes[k], likes[k]->sizes());
    *targets[k] = result[k]->data_ptr();
  }
  result[3] = new_output(weights, weights.sizes());
  a.d_weights = result[3]->data_ptr();
  launch<lopt_backward_cpu, lopt_backward_cuda>(param, seg_offsets, a, make_hyper(hyper));
  return result;
}

}  // namespace

void register_lopt_ops(pybind11::module_& m) {
  m.def("lopt_forward", &lopt_forward, "Fused learned-optimizer step, forward (see metakernels.ops.learned_update)",
        pybind11::arg("param"), pybind11::arg("grad"), pybind11::arg("state"), pybind11::arg("weights"),
        pybind11::arg("seg_offsets"), pybind11::arg("hidden"), pybind11::arg("layers"), pybind11::arg("hyper"),
        pybind11::arg("in_place") = false);
  m.def("lopt_backward", &lopt_backward, "Fused learned-optimizer step, backward", pybind11::arg("param"),
        pybind11::arg("grad"), pybind11::arg("state"), pybind11::arg("weights"), pybind11::arg("norms"),
        pybind11::arg("seg_offsets"), pybind11::arg("hidden"), pybind11::arg("layers"), pybind11::arg("hyper"),
        pybind11::arg("grad_param_out"), pybind11::arg("grad_state_out"), pybind11::arg("needs_grad"));
}

}  // namespace mk
