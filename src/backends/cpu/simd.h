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
#ifdef AFM_X86
// Isa::Avx512Vnni's kernels: AVX-512 plus the int8 dot-product instructions.
#define AFM_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#endif

#ifdef AFM_X86
namespace afm::cpu {

// The sum of the 8 lanes.
AFM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace afm::cpu
#endif
