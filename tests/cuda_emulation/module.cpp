// The emulated counterpart of metakernels._C (python/module.cpp) for the op families that have CUDA kernels:
// the real bindings, built by emulate.py with MK_CUDA_EMULATION, so that on CPU tensors they run the CUDA
// kernels of csrc/cuda compiled for the CPU (python/common.h, launch_kernel).
#include <torch/extension.h>

#include "common.h"

namespace mk {
void register_update_ops(pybind11::module_& m);
void register_lopt_ops(pybind11::module_& m);
void register_norm_ops(pybind11::module_& m);
void register_gelu_ops(pybind11::module_& m);
void register_softmax_ops(pybind11::module_& m);
void register_xent_ops(pybind11::module_& m);
}  // namespace mk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_poison_outputs", [](bool on) { mk::poison_outputs() = on; });
  mk::register_update_ops(m);
  mk::register_lopt_ops(m);
  mk::register_norm_ops(m);
  mk::register_gelu_ops(m);
  mk::register_softmax_ops(m);
  mk::register_xent_ops(m);
}
