// Conversion between fp32 rows and packed bfp8 / bfp4 rows. Format and layout: blockfloat.h.
#include "blockfloat.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "error.h"
#include "multiversion.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace afm {

namespace {

// The signed magnitudes of one block of 16 fp32 values (as bits) under their shared exponent,
// written branch-free over the whole block so the compiler vectorizes it (the variable shift
// is one instruction from AVX2 on): per value, tt-metal's rule of blockfloat.h.
template <int MagBits>
inline void encode_block(const uint32_t* bits, uint32_t shared_exp, int32_t* mags) {
  constexpr int kShift = 24 - MagBits;
  constexpr uint32_t kTie = 1u << (kShift - 1);
  for (int j = 0; j < kBlockFloatBlock; j++) {
    const uint32_t exp = (bits[j] >> 23) & 0xFF;
    const uint32_t shift = std::min(shared_exp - exp, 31u);
    const uint32_t mantissa = ((bits[j] & 0x7FFFFF) | 0x800000) >> shift;  // truncating first
    // To nearest, ties to even: the dropped bits carry into the kept ones when above the tie, or
    // at it with the lowest kept bit odd.
    uint32_t mag = (mantissa + kTie - 1 + ((mantissa >> kShift) & 1)) >> kShift;
    mag = std::min(mag, BlockFloat<MagBits>::mag_mask);             // saturate rather than carry
    mag = exp == 0 ? 0 : mag;  // zero or subnormal: flushed, and no negative zero
    mags[j] = bits[j] >> 31 ? -int32_t(mag) : int32_t(mag);
  }
}

template <int MagBits>
inline void quantize_row(const float* src, int64_t cols, uint8_t* dst) {
  using BF = BlockFloat<MagBits>;
  const int64_t nb = block_float_blocks(cols);
  uint8_t* payload = dst + nb;
  for (int64_t b = 0; b < nb; b++) {
    uint32_t bits[kBlockFloatBlock] = {};  // zero padding past the end of the row
    const int64_t n = std::min(kBlockFloatBlock, cols - b * kBlockFloatBlock);
    std::memcpy(bits, src + b * kBlockFloatBlock, n * sizeof(float));
    uint32_t shared_exp = 0;
    for (int j = 0; j < kBlockFloatBlock; j++) shared_exp = std::max(shared_exp, (bits[j] >> 23) & 0xFF);
    if (shared_exp == 0xFF) {
      for (int j = 0; j < n; j++)
        if (((bits[j] >> 23) & 0xFF) == 0xFF)
          throw Error("block-float conversion: non-finite value at column " + std::to_string(b * kBlockFloatBlock + j));
    }
    dst[b] = uint8_t(shared_exp);
    int32_t mags[kBlockFloatBlock];
    encode_block<MagBits>(bits, shared_exp, mags);
    uint8_t* out = payload + b * BF::payload_bytes;
    if constexpr (MagBits == 7) {
      for (int j = 0; j < 16; j++) out[j] = uint8_t(int8_t(mags[j]));
    } else {
      for (int j = 0; j < 8; j++) out[j] = uint8_t((mags[j] & 0xF) | (mags[j + 8] & 0xF) << 4);
    }
  }
}

AFM_VECTORIZED_CLONES void quantize_bfp8_row(const float* src, int64_t cols, uint8_t* dst) { quantize_row<7>(src, cols, dst); }
AFM_VECTORIZED_CLONES void quantize_bfp4_row(const float* src, int64_t cols, uint8_t* dst) { quantize_row<3>(src, cols, dst); }

#if defined(__x86_64__)
// The same rule with a block in one AVX-512 register, 1.6x the portable loop's speed (which the
// compiler vectorizes across a block; docs/PERFORMANCE.md), and load converts every weight
// through it. The shared exponent is reduced within the register
// (it is wanted there, in every lane), so consecutive blocks overlap. A row holding inf or NaN
// is quantized again by the portable loop, which names the column.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see backends/cpu/dot.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int MagBits>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_row_avx512(const float* src, int64_t cols,
                                                                                uint8_t* dst) {
  using BF = BlockFloat<MagBits>;
  constexpr int kShift = 24 - MagBits;
  const int64_t nb = block_float_blocks(cols);
  uint8_t* payload = dst + nb;
  const __m512i exp_mask = _mm512_set1_epi32(0xFF), one = _mm512_set1_epi32(1);
  const __m512i tie_less_one = _mm512_set1_epi32((1 << (kShift - 1)) - 1);
  __mmask16 non_finite = 0;
  for (int64_t b = 0; b < nb; b++) {
    const int64_t n = std::min(kBlockFloatBlock, cols - b * kBlockFloatBlock);
    const float* in = src + b * kBlockFloatBlock;
    const __m512i bits = n == kBlockFloatBlock ? _mm512_loadu_si512(in) : _mm512_maskz_loadu_epi32(__mmask16((1u << n) - 1), in);
    const __m512i exp = _mm512_and_si512(_mm512_srli_epi32(bits, 23), exp_mask);
    __m512i shared = _mm512_max_epu32(exp, _mm512_shuffle_i32x4(exp, exp, 0x4E));  // halves swapped
    shared = _mm512_max_epu32(shared, _mm512_shuffle_i32x4(shared, shared, 0xB1));  // quarters
    shared = _mm512_max_epu32(shared, _mm512_shuffle_epi32(shared, _MM_PERM_BADC));
    shared = _mm512_max_epu32(shared, _mm512_shuffle_epi32(shared, _MM_PERM_CDAB));  // in every lane
    non_finite |= _mm512_cmpeq_epi32_mask(shared, exp_mask);
    dst[b] = uint8_t(_mm_cvtsi128_si32(_mm512_castsi512_si128(shared)));
    const __m512i shift = _mm512_min_epu32(_mm512_sub_epi32(shared, exp), _mm512_set1_epi32(31));
    // (bits & 0x7FFFFF) | 0x800000 in one ternary-logic instruction (A & B | C).
    const __m512i mantissa = _mm512_srlv_epi32(
        _mm512_ternarylogic_epi32(bits, _mm512_set1_epi32(0x7FFFFF), _mm512_set1_epi32(0x800000), 0xEA), shift);
    // Rounded to nearest, ties to even, as (m + tie - 1 + the kept lowest bit) >> kShift.
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(mantissa, kShift), one);
    __m512i mag = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(mantissa, tie_less_one), odd), kShift);
    mag = _mm512_min_epu32(mag, _mm512_set1_epi32(int(BF::mag_mask)));
    mag = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(exp, exp), mag);  // zeros and subnormals: 0
    const __m512i mags = _mm512_mask_sub_epi32(mag, _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512()),
                                               _mm512_setzero_si512(), mag);
    uint8_t* out = payload + b * BF::payload_bytes;
    if constexpr (MagBits == 7) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(mags));
    } else {
      const __m512i nibbles = _mm512_and_si512(mags, _mm512_set1_epi32(0xF));
      const __m256i pairs = _mm256_or_si256(_mm512_castsi512_si256(nibbles),
                                            _mm256_slli_epi32(_mm512_extracti64x4_epi64(nibbles, 1), 4));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm256_cvtepi32_epi8(pairs));
    }
  }
  if (non_finite) quantize_row<MagBits>(src, cols, dst);
}
#pragma GCC diagnostic pop

// The same in AVX2, a block in two 8-lane registers, for CPUs without AVX-512 (Zen 3), where the
// portable loop's clone for that ISA converted every weight at load.
template <int MagBits>
__attribute__((target("avx2"))) void quantize_row_avx2(const float* src, int64_t cols, uint8_t* dst) {
  using BF = BlockFloat<MagBits>;
  constexpr int kShift = 24 - MagBits;
  const int64_t nb = block_float_blocks(cols);
  uint8_t* payload = dst + nb;
  const __m256i exp_mask = _mm256_set1_epi32(0xFF), one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
  const __m256i tie_less_one = _mm256_set1_epi32((1 << (kShift - 1)) - 1);
  const __m256i mantissa_bits = _mm256_set1_epi32(0x7FFFFF), implicit_one = _mm256_set1_epi32(0x800000);
  __m256i non_finite = zero;
  for (int64_t b = 0; b < nb; b++) {
    const int64_t n = std::min(kBlockFloatBlock, cols - b * kBlockFloatBlock);
    alignas(32) uint32_t padded[kBlockFloatBlock] = {};
    const float* in = src + b * kBlockFloatBlock;
    if (n < kBlockFloatBlock) {  // the row's last block: zeros past its end
      std::memcpy(padded, in, n * sizeof(float));
      in = reinterpret_cast<const float*>(padded);
    }
    __m256i bits[2], exp[2];
    for (int h = 0; h < 2; h++) {
      bits[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + 8 * h));
      exp[h] = _mm256_and_si256(_mm256_srli_epi32(bits[h], 23), exp_mask);
    }
    __m256i shared = _mm256_max_epu32(exp[0], exp[1]);
    shared = _mm256_max_epu32(shared, _mm256_permute2x128_si256(shared, shared, 0x01));  // 128-bit halves swapped
    shared = _mm256_max_epu32(shared, _mm256_shuffle_epi32(shared, _MM_SHUFFLE(1, 0, 3, 2)));
    shared = _mm256_max_epu32(shared, _mm256_shuffle_epi32(shared, _MM_SHUFFLE(2, 3, 0, 1)));  // in every lane
    non_finite = _mm256_or_si256(non_finite, _mm256_cmpeq_epi32(shared, exp_mask));
    dst[b] = uint8_t(_mm_cvtsi128_si32(_mm256_castsi256_si128(shared)));
    __m256i mags[2];
    for (int h = 0; h < 2; h++) {
      const __m256i shift = _mm256_min_epu32(_mm256_sub_epi32(shared, exp[h]), _mm256_set1_epi32(31));
      const __m256i mantissa =
          _mm256_srlv_epi32(_mm256_or_si256(_mm256_and_si256(bits[h], mantissa_bits), implicit_one), shift);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(mantissa, kShift), one);
      __m256i mag = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(mantissa, tie_less_one), odd), kShift);
      mag = _mm256_min_epu32(mag, _mm256_set1_epi32(int(BF::mag_mask)));
      mag = _mm256_andnot_si256(_mm256_cmpeq_epi32(exp[h], zero), mag);  // zeros and subnormals: 0
      mags[h] = _mm256_sign_epi32(mag, _mm256_or_si256(bits[h], one));   // negated where the sign bit is set
    }
    uint8_t* out = payload + b * BF::payload_bytes;
    if constexpr (MagBits == 7) {
      // 32-bit to 8-bit with saturation keeps every value (|mag| <= 127); packs interleave lanes.
      const __m256i words = _mm256_packs_epi32(mags[0], mags[1]);  // [0-3 8-11 | 4-7 12-15]
      const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi32(bytes, _MM_SHUFFLE(3, 1, 2, 0)));
    } else {
      const __m256i nibbles = _mm256_or_si256(_mm256_and_si256(mags[0], _mm256_set1_epi32(0xF)),
                                              _mm256_slli_epi32(_mm256_and_si256(mags[1], _mm256_set1_epi32(0xF)), 4));
      const __m256i words = _mm256_packus_epi32(nibbles, nibbles);  // [0-3 0-3 | 4-7 4-7]
      const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi32(bytes, _MM_SHUFFLE(3, 1, 2, 0)));
    }
  }
  if (!_mm256_testz_si256(non_finite, non_finite)) quantize_row<MagBits>(src, cols, dst);
}
#endif

template <int MagBits>
void dequantize_row(const uint8_t* src, int64_t cols, float* dst) {
  const uint8_t* payloads = src + block_float_blocks(cols);
  for (int64_t i = 0; i < cols; i++) dst[i] = BlockFloat<MagBits>::value(src, payloads, i);
}

void check_block_float(WeightFormat format) {
  if (!is_block_float(format)) {
    throw Error("block-float conversion: weight format is not bfp8 or bfp4");
  }
}

}  // namespace

bool is_block_float(WeightFormat format) {
  return format == WeightFormat::BFP8 || format == WeightFormat::BFP4;
}

int64_t block_float_row_bytes(WeightFormat format, int64_t cols) {
  check_block_float(format);
  return format == WeightFormat::BFP8 ? Bfp8::row_bytes(cols) : Bfp4::row_bytes(cols);
}

bool quantizer_supported(Quantizer quantizer) {
#if defined(__x86_64__)
  if (quantizer == Quantizer::Avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (quantizer == Quantizer::Avx2) return __builtin_cpu_supports("avx2");
  return true;
#else
  return quantizer == Quantizer::Best || quantizer == Quantizer::Portable;
#endif
}

void block_float_quantize_row(WeightFormat format, const float* src, int64_t cols, uint8_t* dst, Quantizer quantizer) {
  check_block_float(format);
  static const bool has_avx512 = quantizer_supported(Quantizer::Avx512), has_avx2 = quantizer_supported(Quantizer::Avx2);
  if (quantizer == Quantizer::Avx512 && !has_avx512) throw Error("block-float conversion: this CPU has no AVX-512");
  if (quantizer == Quantizer::Avx2 && !has_avx2) throw Error("block-float conversion: this CPU has no AVX2");
#if defined(__x86_64__)
  const bool bfp8 = format == WeightFormat::BFP8;
  if (quantizer == Quantizer::Avx512 || (quantizer == Quantizer::Best && has_avx512))
    return bfp8 ? quantize_row_avx512<7>(src, cols, dst) : quantize_row_avx512<3>(src, cols, dst);
  if (quantizer == Quantizer::Avx2 || (quantizer == Quantizer::Best && has_avx2))
    return bfp8 ? quantize_row_avx2<7>(src, cols, dst) : quantize_row_avx2<3>(src, cols, dst);
#endif
  if (format == WeightFormat::BFP8) {
    quantize_bfp8_row(src, cols, dst);
  } else {
    quantize_bfp4_row(src, cols, dst);
  }
}

void block_float_dequantize_row(WeightFormat format, const uint8_t* src, int64_t cols, float* dst) {
  check_block_float(format);
  if (format == WeightFormat::BFP8) {
    dequantize_row<7>(src, cols, dst);
  } else {
    dequantize_row<3>(src, cols, dst);
  }
}

}  // namespace afm
