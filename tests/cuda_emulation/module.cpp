// The emulated counterpart of metakernels._C (python/module.cpp) for the op families that have CUDA kernels:
// the real bindings, built by emulate.py with MK_CUDA_EMULATION, so that on CPU tensors they run the CUDA
// kernels of csrc/cuda compiled for the CPU (python/common.h, launch_kernel).
#include <torch/extension.h>

#include "common.h"
#include "register_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_poison_outputs", [](bool on) { mk::poison_outputs() = on; });
  mk::register_ops_with_cuda_kernels(m);
}
