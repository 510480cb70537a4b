// Conversion between fp32 rows and packed bfp8 / bfp4 rows. Format and layout: blockfloat.h.
#include "blockfloat.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "error.h"
#include "multiversion.h"

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
    const uint32_t rest = mantissa & ((1u << kShift) - 1);
    uint32_t mag = mantissa >> kShift;
    mag += uint32_t(rest > kTie) | (uint32_t(rest == kTie) & mag);  // to nearest, ties to even
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

void block_float_quantize_row(WeightFormat format, const float* src, int64_t cols, uint8_t* dst) {
  check_block_float(format);
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
