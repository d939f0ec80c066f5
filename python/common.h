// Shared helpers of the metakernels._C bindings: dtype mapping, output allocation (with optional
// poisoning for tests), and the per-device launch of a raw-pointer kernel.
#pragma once

#include <torch/extension.h>

#include <string>

#include "../csrc/update_math.h"

namespace mk {

// When set (tests do), every output buffer is filled with NaN before a kernel writes it, so an
// element a kernel forgets to write cannot pass by holding a stale correct value.
bool& poison_outputs();

DType dtype_code(const at::Tensor& t, const char* name);

// The kernels' accumulation dtype for t's storage dtype: float64 for float64, float32 otherwise.
at::ScalarType acc_type(const at::Tensor& t);

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef shape);

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t P);

// t is on ref's device, has `dtype` and `shape`, and is contiguous; the message names the argument.
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape,
                  at::ScalarType dtype);

}  // namespace mk
