// Block-float weights as the unsigned bytes that AVX-512 VNNI's `vpdpbusd` multiplies (it takes
// unsigned by signed bytes): each weight read as its value + an offset (128 for bfp8, 8 for
// bfp4). The int8 kernels start their sums from x's offset_sums (int8_dot.h), which take the
// offset out exactly. Shared by the dot kernels and the GEMM.
#pragma once
#include <algorithm>
#include <cstdint>

#include "backends/cpu/int8_dot.h"
#include "backends/cpu/simd.h"
#include "blockfloat.h"

#ifdef AFM_X86
namespace afm::cpu {

// A block's scale for its payload's integers is 2^(exponent byte - this): the byte is an f32
// exponent field, and the payload's magnitudes carry mag_bits - 1 fraction bits.
template <class BF>
inline constexpr float kExponentBias = float(127 + BF::mag_bits - 1);

// Group g's 64 weights of a row (the blocks' payloads start at `payloads`), in order, as
// value + offset; blocks past the row (blocks_left < 4) read as value 0.
template <class BF>
AFM_AVX512_VNNI inline __m512i load_offset_weights(const uint8_t* payloads, int64_t g, int64_t blocks_left) {
  const int64_t n = std::min<int64_t>(4, blocks_left);
  if constexpr (BF::mag_bits == 7) {
    const __mmask64 m = n == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * n)) - 1;
    return _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, payloads + kInt8Group * g), _mm512_set1_epi8(char(0x80)));
  } else {
    // 8 bytes per block hold values 0-7 in the low nibbles and 8-15 in the high ones; xor 0x88
    // turns each two's-complement nibble v into v + 8.
    const __mmask32 m = n == 4 ? ~__mmask32(0) : (__mmask32(1) << (8 * n)) - 1;
    const __m256i b = _mm256_xor_si256(_mm256_maskz_loadu_epi8(m, payloads + 32 * g), _mm256_set1_epi8(char(0x88)));
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
    // Per 128-bit lane: unpacklo gives blocks 0 and 2 (low then high nibbles), unpackhi 1 and 3.
    const __m512i even = _mm512_castsi256_si512(_mm256_unpacklo_epi64(lo, hi));
    const __m512i odd = _mm512_castsi256_si512(_mm256_unpackhi_epi64(lo, hi));
    return _mm512_permutex2var_epi64(even, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), odd);
  }
}

}  // namespace afm::cpu
#endif
