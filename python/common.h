// Shared helpers of the metakernels._C bindings: dtype mapping, output allocation (with optional
// poisoning for tests), and the per-device launch of a raw-pointer kernel.
#pragma once

#include <torch/extension.h>

#include <string>

#include "../csrc/update_math.h"

#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace mk {

// When set (tests do), every output buffer is filled with NaN before a kernel writes it, so an
// element a kernel forgets to write cannot pass by holding a stale correct value.
bool& poison_outputs();

DType dtype_code(const at::Tensor& t, const char* name);

// The kernels' accumulation dtype for t's storage dtype: float64 for float64, float32 otherwise.
at::ScalarType acc_type(const at::Tensor& t);

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef shape);

// A kernel's scratch space of `bytes` bytes on like's device; when outputs are poisoned, every byte is 0xff
// (a NaN in every float type), so that a kernel reading a partial it never wrote cannot pass.
at::Tensor new_scratch(const at::Tensor& like, int64_t bytes);

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t P);

// t is on ref's device, has `dtype` and `shape`, and is contiguous; the message names the argument.
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape,
                  at::ScalarType dtype);

// Runs a kernel family's launcher on ref's device: cpu() for a CPU tensor; for a CUDA tensor, under a
// guard of its device, cuda(stream) with the current cudaStream_t, which returns an error string or
// nullptr.  Any other device (or CUDA in a build without CUDA kernels) raises, naming `family`.
//
// Built with MK_CUDA_EMULATION (tests/cuda_emulation: the CUDA kernels compiled for the CPU against a stand-in
// runtime), a CPU tensor runs cuda(nullptr) instead, so that tests check the CUDA kernels through these same
// bindings where no GPU is.
template <typename CpuFn, typename CudaFn>
void launch_kernel(const at::Tensor& ref, const char* family, CpuFn&& cpu, CudaFn&& cuda) {
#ifdef MK_CUDA_EMULATION
  (void)cpu;
  TORCH_CHECK(ref.device().is_cpu(), "metakernels: the emulated CUDA kernels run on CPU tensors, got ", ref.device());
  const char* err = cuda(nullptr);
  TORCH_CHECK(err == nullptr, "metakernels: emulated CUDA ", family, " kernel failed: ", err);
#else
  if (ref.device().is_cpu()) {
    cpu();
    return;
  }
#ifdef WITH_CUDA
  if (ref.device().is_cuda()) {
    const c10::cuda::CUDAGuard guard(ref.device());
    const char* err = cuda(static_cast<void*>(at::cuda::getCurrentCUDAStream().stream()));
    TORCH_CHECK(err == nullptr, "metakernels: CUDA ", family, " kernel failed: ", err);
    return;
  }
  constexpr const char* kCudaBuilt = "yes";
#else
  (void)cuda;
  constexpr const char* kCudaBuilt = "no";
#endif
  TORCH_CHECK(false, "metakernels: no compiled ", family, " kernel for device ", ref.device(),
              " (this build has CUDA kernels: ", kCudaBuilt, ")");
#endif
}

}  // namespace mk
