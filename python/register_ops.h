// The op families' registration functions (python/<family>_binding.cpp), for metakernels._C (module.cpp) and
// for its emulated counterpart in tests/cuda_emulation, which registers the families with CUDA kernels only.
#pragma once

#include <torch/extension.h>

namespace mk {
void register_update_ops(pybind11::module_& m);
void register_lopt_ops(pybind11::module_& m);
void register_norm_ops(pybind11::module_& m);
void register_gelu_ops(pybind11::module_& m);
void register_softmax_ops(pybind11::module_& m);
void register_xent_ops(pybind11::module_& m);
void register_attention_ops(pybind11::module_& m);
void register_matmul_ops(pybind11::module_& m);

// The families with CUDA kernels (csrc/cuda/<family>.cu; tests/cuda_emulation/emulate.py's FAMILIES).
inline void register_ops_with_cuda_kernels(pybind11::module_& m) {
  register_update_ops(m);
  register_lopt_ops(m);
  register_norm_ops(m);
  register_gelu_ops(m);
  register_softmax_ops(m);
  register_xent_ops(m);
}
}  // namespace mk
