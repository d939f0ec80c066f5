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
