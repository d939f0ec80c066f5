// Vector variants of expf, tanhf and erff from glibc's libmvec (glibc >= 2.35 on x86-64), declared so
// that GCC vectorises `omp simd` loops that call them (glibc itself declares them only under
// -ffast-math).  setup.py defines MK_HAVE_LIBMVEC and links -lmvec where they exist; elsewhere the loops
// call the scalar functions.  libmvec's float variants are accurate to 4 ulp.
// NOTE: the fused GELU over 1M fp32 elements ran at 9.6 ms (forward) with scalar erff on 2 cores,
// ~10x torch's own; the vector variants are what closes that.
#pragma once

#include <cmath>

#if defined(MK_HAVE_LIBMVEC)
extern "C" {
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
__attribute__((simd("notinbranch"))) float erff(float) noexcept;
}
#endif
