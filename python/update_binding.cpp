// Bindings of the fused update ops: argument checks, output allocation, and the call of the CPU or
// CUDA kernel for the tensors' device.  Python (metakernels/ops/update.py) validates user input first
// and wires these into autograd; the checks here keep a direct call of _C from crashing the process.
#include <torch/extension.h>

#include <array>
#include <optional>
#include <vector>

#include "../csrc/update_kernels.h"
#include "common.h"

namespace mk {
namespace {

using OptTensor = std::optional<at::Tensor>;

UpdateHyper make_hyper(const std::vector<double>& h) {
  TORCH_CHECK(h.size() == 7, "metakernels: expected 7 hyper-parameters, got ", h.size());
  return UpdateHyper{h[0], h[1], h[2], h[3], h[4], h[5], h[6]};
}

int64_t row_stride(const at::Tensor& t, int64_t P) { return t.dim() == 2 ? P : 0; }

// The number of tasks of a call: the leading size of its [T, P] operands (all equal), or 1.
int64_t task_count(std::initializer_list<const at::Tensor*> operands) {
  int64_t T = -1;
  for (const at::Tensor* t : operands) {
    if (t == nullptr || t->dim() != 2) continue;
    TORCH_CHECK(T < 0 || T == t->size(0), "metakernels: operands disagree on the task count: ", T, " vs ",
                t->size(0));
    T = t->size(0);
  }
  return T;
}

// The CPU and CUDA entry points are template arguments, so that a build without CUDA kernels never
// references the CUDA ones (the lambda that calls them is not emitted there).
template <auto cpu, auto cuda, typename Args>
void launch(const at::Tensor& ref, UpdateKind kind, const UpdateHyper& hyper, const Args& args) {
  const DType dtype = dtype_code(ref, "params");
  launch_kernel(ref, "update", [&] { cpu(kind, dtype, hyper, args); },
                [&](void* stream) { return cuda(kind, dtype, hyper, args, stream); });
}

const char* state_name(int k) { return k == 0 ? "state0" : "state1"; }

std::vector<at::Tensor> update_forward(int64_t kind_code, const at::Tensor& param, const at::Tensor& grad,
                                       const std::vector<at::Tensor>& states, const OptTensor& lr,
                                       const std::vector<double>& hyper_values) {
  const auto kind = static_cast<UpdateKind>(kind_code);
  TORCH_CHECK(kind_code >= 0 && kind_code <= 2, "metakernels: unknown update kind ", kind_code);
  const int nstates = update_num_states(kind);
  TORCH_CHECK(static_cast<int>(states.size()) == nstates, "metakernels: this update takes ", nstates,
              " state tensors, got ", states.size());
  dtype_code(param, "params");
  const int64_t P = param.size(-1);
  check_operand(param, "params", param, P);
  check_operand(grad, "grads", param, P);
  for (int k = 0; k < nstates; ++k) check_operand(states[k], state_name(k), param, P);
  if (lr) check_operand(*lr, "lr", param, P);
  const int64_t T = task_count({&param, &grad, nstates > 0 ? &states[0] : nullptr,
                                nstates > 1 ? &states[1] : nullptr, lr ? &*lr : nullptr});
  const std::vector<int64_t> out_shape = T < 0 ? std::vector<int64_t>{P} : std::vector<int64_t>{T, P};

  UpdateForwardArgs a{};
  a.T = T < 0 ? 1 : T;
  a.P = P;
  a.param = param.data_ptr();
  a.param_rs = row_stride(param, P);
  a.grad = grad.data_ptr();
  a.grad_rs = row_stride(grad, P);
  std::vector<at::Tensor> outs{new_output(param, out_shape)};
  a.param_out = outs[0].data_ptr();
  for (int k = 0; k < nstates; ++k) {
    a.state[k] = states[k].data_ptr();
    a.state_rs[k] = row_stride(states[k], P);
    outs.push_back(new_output(param, out_shape));
    a.state_out[k] = outs.back().data_ptr();
  }
  if (lr) {
    a.lr = lr->data_ptr();
    a.lr_rs = row_stride(*lr, P);
  }
  launch<update_forward_cpu, update_forward_cuda>(param, kind, make_hyper(hyper_values), a);
  return outs;
}

// Cotangent buffer for an input of the given dimensionality: [T, P] written per task, or [P] summed
// over tasks when the input was broadcast; nothing when that input needs no gradient.
std::optional<at::Tensor> cotangent(bool needed, bool input_batched, const at::Tensor& like, int64_t T,
                                    int64_t P, void*& ptr, GradMode& mode) {
  ptr = nullptr;
  mode = GradMode::kNone;
  if (!needed) return std::nullopt;
  at::Tensor out = input_batched ? new_output(like, {T, P}) : new_output(like, {P});
  ptr = out.data_ptr();
  mode = input_batched ? GradMode::kPerTask : GradMode::kSumOverTasks;
  return out;
}

// Returns the cotangents of (params, grads, state0, state1, lr); params' is None when params was
// [T, P] (its cotangent is grad_param_out itself), and each is None when not requested.
std::vector<OptTensor> update_backward(int64_t kind_code, int64_t T, bool param_batched,
                                       const at::Tensor& grad, const std::vector<at::Tensor>& states,
                                       const OptTensor& lr, const OptTensor& grad_param_out,
                                       const std::vector<OptTensor>& grad_state_out,
                                       const std::vector<bool>& needs_grad,
                                       const std::vector<double>& hyper_values) {
  const auto kind = static_cast<UpdateKind>(kind_code);
  TORCH_CHECK(kind_code >= 0 && kind_code <= 2, "metakernels: unknown update kind ", kind_code);
  const int nstates = update_num_states(kind);
  TORCH_CHECK(static_cast<int>(states.size()) == nstates && static_cast<int>(grad_state_out.size()) == nstates,
              "metakernels: this update takes ", nstates, " states and state cotangents");
  TORCH_CHECK(needs_grad.size() == 5, "metakernels: needs_grad must have 5 entries (params, grads, state0, state1, lr)");
  TORCH_CHECK(T >= 1, "metakernels: task count must be positive, got ", T);
  dtype_code(grad, "grads");
  const int64_t P = grad.size(-1);
  check_operand(grad, "grads", grad, P);
  for (int k = 0; k < nstates; ++k) check_operand(states[k], state_name(k), grad, P);
  if (lr) check_operand(*lr, "lr", grad, P);
  const auto check_out = [&](const OptTensor& t, const char* name) {
    if (!t) return;
    check_operand(*t, name, grad, P);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T, "metakernels: ", name, " must be [", T, ", ", P,
                "], got ", t->sizes());
  };
  check_out(grad_param_out, "grad of params'");
  for (int k = 0; k < nstates; ++k) check_out(grad_state_out[k], "grad of a new state");

  UpdateBackwardArgs a{};
  a.T = T;
  a.P = P;
  a.grad = grad.data_ptr();
  a.grad_rs = row_stride(grad, P);
  for (int k = 0; k < nstates; ++k) {
    a.state[k] = states[k].data_ptr();
    a.state_rs[k] = row_stride(states[k], P);
    a.grad_state_out[k] = grad_state_out[k] ? grad_state_out[k]->data_ptr() : nullptr;
  }
  if (lr) {
    a.lr = lr->data_ptr();
    a.lr_rs = row_stride(*lr, P);
  }
  a.grad_param_out = grad_param_out ? grad_param_out->data_ptr() : nullptr;

  std::vector<OptTensor> result(5);
  result[0] = cotangent(needs_grad[0] && !param_batched, false, grad, T, P, a.d_param, a.d_param_mode);
  result[1] = cotangent(needs_grad[1], grad.dim() == 2, grad, T, P, a.d_grad, a.d_grad_mode);
  for (int k = 0; k < nstates; ++k)
    result[2 + k] = cotangent(needs_grad[2 + k], states[k].dim() == 2, grad, T, P, a.d_state[k], a.d_state_mode[k]);
  if (lr) result[4] = cotangent(needs_grad[4], lr->dim() == 2, grad, T, P, a.d_lr, a.d_lr_mode);
  launch<update_backward_cpu, update_backward_cuda>(grad, kind, make_hyper(hyper_values), a);
  return result;
}

}  // namespace

void register_update_ops(pybind11::module_& m) {
  m.def("update_forward", &update_forward, "Fused task-batched update, forward (see metakernels.ops.update)",
        pybind11::arg("kind"), pybind11::arg("param"), pybind11::arg("grad"), pybind11::arg("states"),
        pybind11::arg("lr"), pybind11::arg("hyper"));
  m.def("update_backward", &update_backward, "Fused task-batched update, backward",
        pybind11::arg("kind"), pybind11::arg("T"), pybind11::arg("param_batched"), pybind11::arg("grad"),
        pybind11::arg("states"), pybind11::arg("lr"), pybind11::arg("grad_param_out"),
        pybind11::arg("grad_state_out"), pybind11::arg("needs_grad"), pybind11::arg("hyper"));
}

}  // namespace mk
