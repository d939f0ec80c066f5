// The metakernels._C extension module: one registration call per op family.
#include <torch/extension.h>

#include "../csrc/cpu/clones.h"
#include "common.h"

namespace mk {
void register_update_ops(pybind11::module_& m);
void register_lopt_ops(pybind11::module_& m);
void register_norm_ops(pybind11::module_& m);
void register_gelu_ops(pybind11::module_& m);
void register_softmax_ops(pybind11::module_& m);
void register_xent_ops(pybind11::module_& m);
void register_attention_ops(pybind11::module_& m);
void register_matmul_ops(pybind11::module_& m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metakernels compiled kernels (CPU, and CUDA when built with it)";
  m.def("has_cuda", []() {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA kernels");
  m.def("set_poison_outputs", [](bool on) { mk::poison_outputs() = on; },
        "Fill every output buffer with NaN before a kernel writes it (for tests)");
  m.def("set_cpu_avx512", [](bool on) { mk::cpu_avx512_allowed() = on; },
        "Let the CPU kernels use their AVX-512 instances where the CPU has them (default on; off runs the AVX2 "
        "instances, for tests)");
  m.def("cpu_uses_avx512", &mk::cpu_uses_avx512, "Whether the CPU kernels run their AVX-512 instances now");
  mk::register_update_ops(m);
  mk::register_lopt_ops(m);
  mk::register_norm_ops(m);
  mk::register_gelu_ops(m);
  mk::register_softmax_ops(m);
  mk::register_xent_ops(m);
  mk::register_attention_ops(m);
  mk::register_matmul_ops(m);
}
