// Per-function ISA attributes for the CPU kernels, so the library builds without -march flags and
// one binary runs on any x86-64 machine: a kernel compiled for an ISA is only called after
// isa_supported (dot.h) said the CPU has it.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AFM_X86 1
#define AFM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define AFM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#endif
