// Binding of the task-batched float32 product (csrc/matmul_kernels.h): argument checks and the call.
// metakernels/ops/matmul.py decides when to call it; the checks keep a direct call from crashing.
#include <torch/extension.h>

#include <optional>

#include "../csrc/matmul_kernels.h"

namespace mk {
namespace {

void check_float32_cpu(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == dims, "metakernels.task_matmul: ",
              name, " must be a ", dims, "-d float32 CPU tensor, got ", t.dim(), "-d ", t.scalar_type(), " on ",
              t.device());
}

// out = start + a @ b per batch item; out is written, not allocated (the caller picks its strides).
void task_matmul(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& start, at::Tensor& out) {
  check_float32_cpu(a, "a", 3);
  check_float32_cpu(b, "b", 3);
  check_float32_cpu(out, "out", 3);
  const int64_t B = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  TORCH_CHECK(b.size(0) == B && b.size(1) == K, "metakernels.task_matmul: b must be [", B, ", ", K, ", N], got ",
              b.sizes());
  TORCH_CHECK(out.size(0) == B && out.size(1) == M && out.size(2) == N && (out.stride(2) == 1 || N == 1),
              "metakernels.task_matmul: out must be [", B, ", ", M, ", ", N, "] with contiguous rows, got ",
              out.sizes(), " strides ", out.strides());
  TaskMatmulArgs args{B, M, K, N, a.data_ptr<float>(), a.stride(0), a.stride(1), a.stride(2), b.data_ptr<float>(),
                      b.stride(0), b.stride(1), b.stride(2), nullptr, 0, 0, out.data_ptr<float>(), out.stride(0),
                      out.stride(1)};
  if (start) {
    const at::Tensor& s = *start;
    check_float32_cpu(s, "start", 3);
    TORCH_CHECK(s.size(0) == B && (s.size(1) == M || s.size(1) == 1) && s.size(2) == N && (s.stride(2) == 1 || N == 1),
                "metakernels.task_matmul: start must be [", B, ", ", M, " or 1, ", N, "] with contiguous rows, got ",
                s.sizes(), " strides ", s.strides());
    args.start = s.data_ptr<float>();
    args.start_batch = s.stride(0);
    args.start_row = s.size(1) == 1 ? 0 : s.stride(1);
  }
  TORCH_CHECK(task_matmul_uses_avx512(), "metakernels.task_matmul needs AVX-512 (allowed: see set_cpu_avx512)");
  task_matmul_cpu(args);
}

}  // namespace

void register_matmul_ops(pybind11::module_& m) {
  m.def("task_matmul", &task_matmul, "out = start + a @ b per batch item (float32, CPU)", pybind11::arg("a"),
        pybind11::arg("b"), pybind11::arg("start"), pybind11::arg("out"));
  m.def("task_matmul_available", &task_matmul_uses_avx512,
        "Whether task_matmul can run on this CPU now (it needs AVX-512)");
}

}  // namespace mk
