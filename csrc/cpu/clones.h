// Function multi-versioning of the CPU kernels' inner loops.
#pragma once

// The per-element loops are compiled twice on x86-64, for AVX2 and for the baseline ISA, and the
// loader picks one per machine (GCC function multi-versioning), so one build runs everywhere.
// NOTE: measured on 2 EPYC cores, 16M fp32 elements: Adam's backward is compute-bound at SSE width
// (61 ms on one thread, 31 ms on two: the sqrt and the two divisions per element).
#if defined(__x86_64__) && defined(__GNUC__)
#define MK_CPU_CLONES __attribute__((noinline, target_clones("avx2", "default")))
#else
#define MK_CPU_CLONES __attribute__((noinline))
#endif

// The learned-optimizer loops are FMA-bound, so their vector clone targets x86-64-v3 (AVX2 + FMA).
#if defined(__x86_64__) && defined(__GNUC__)
#define MK_CPU_CLONES_FMA __attribute__((noinline, target_clones("arch=x86-64-v3", "default")))
#else
#define MK_CPU_CLONES_FMA __attribute__((noinline))
#endif

// Helpers of a cloned function: inlined into it, so that each clone compiles them for its own target (a
// helper left out of line is compiled once, for the baseline ISA).
#if defined(__GNUC__)
#define MK_CPU_INLINE inline __attribute__((always_inline))
#else
#define MK_CPU_INLINE inline
#endif

// The learned optimizer's MLP also has an instance with 512-bit vectors, compiled for x86-64-v4 and
// called where the CPU has AVX-512 F, BW, CD, DQ and VL (chosen at run time, csrc/cpu/lopt.cpp) unless
// switched off (metakernels._C.set_cpu_avx512, so that tests reach the AVX2 instance on any machine).
#if defined(__x86_64__) && defined(__GNUC__)
#define MK_CPU_AVX512_PATH 1
#define MK_CPU_AVX512 __attribute__((noinline, target("arch=x86-64-v4")))
#else
#define MK_CPU_AVX512_PATH 0
#endif

namespace mk {
inline bool& cpu_avx512_allowed() {
  static bool allowed = true;
  return allowed;
}

inline bool cpu_uses_avx512() {
#if MK_CPU_AVX512_PATH
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  return has && cpu_avx512_allowed();
#else
  return false;
#endif
}
}  // namespace mk
