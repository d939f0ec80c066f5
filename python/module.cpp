// The metakernels._C extension module: one registration call per op family.
#include <torch/extension.h>

#include "../csrc/cpu/clones.h"
#include "common.h"
#include "register_ops.h"

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
  mk::register_ops_with_cuda_kernels(m);
  mk::register_attention_ops(m);
  mk::register_matmul_ops(m);
}
