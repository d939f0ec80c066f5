#include "common.h"

#include <limits>

namespace mk {

bool& poison_outputs() {
  static bool flag = false;
  return flag;
}

DType dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "metakernels: ", name, " must be float32, float64, bfloat16 or float16, got ",
                       t.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor new_output(const at::Tensor& like, at::IntArrayRef shape) {
  at::Tensor out = at::empty(shape, like.options());
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

at::Tensor new_scratch(const at::Tensor& like, int64_t bytes) {
  at::Tensor out = at::empty({bytes}, like.options().dtype(at::kByte));
  if (poison_outputs()) out.fill_(0xff);
  return out;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t P) {
  TORCH_CHECK(t.device() == ref.device(), "metakernels: ", name, " is on ", t.device(), ", expected ",
              ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "metakernels: ", name, " has dtype ",
                   t.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "metakernels: ", name, " must be [P] or [T, P], got shape ",
              t.sizes());
  TORCH_CHECK(t.size(-1) == P, "metakernels: ", name, " has ", t.size(-1), " parameters, expected ", P);
  TORCH_CHECK(t.is_contiguous(), "metakernels: ", name, " must be contiguous");
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref, at::IntArrayRef shape,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.device() == ref.device(), "metakernels: ", name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "metakernels: ", name, " has dtype ", t.scalar_type(), ", expected ",
                   dtype);
  TORCH_CHECK(t.sizes() == shape, "metakernels: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "metakernels: ", name, " must be contiguous");
}

}  // namespace mk
