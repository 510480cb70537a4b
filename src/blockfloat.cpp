// Conversion between fp32 rows and packed bfp8 / bfp4 rows. Format and layout: blockfloat.h.
// This runs once per weight at load time, so it is plain scalar code.
#include "blockfloat.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "error.h"

namespace afm {

namespace {

// The signed magnitude of one fp32 value (bits) in a block with shared exponent shared_exp.
template <int MagBits>
int encode(uint32_t bits, uint32_t shared_exp) {
  const uint32_t exp = (bits >> 23) & 0xFF;
  if (exp == 0) return 0;  // zero or subnormal: flushed, and no negative zero
  constexpr int kShift = 24 - MagBits;
  constexpr uint32_t kTie = 1u << (kShift - 1);
  uint32_t mantissa = (bits & 0x7FFFFF) | 0x800000;
  mantissa >>= std::min(shared_exp - exp, 31u);  // truncating, before the rounding below
  const uint32_t rest = mantissa & ((1u << kShift) - 1);
  uint32_t mag = mantissa >> kShift;
  if (rest > kTie || (rest == kTie && (mag & 1))) mag++;
  mag = std::min(mag, BlockFloat<MagBits>::mag_mask);  // saturate rather than carry
  return bits >> 31 ? -int(mag) : int(mag);  // -0 is 0: a zero magnitude has no sign
}

template <int MagBits>
void quantize_row(const float* src, int64_t cols, uint8_t* dst) {
  using BF = BlockFloat<MagBits>;
  const int64_t nb = block_float_blocks(cols);
  uint8_t* payload = dst + nb;
  for (int64_t b = 0; b < nb; b++) {
    uint32_t bits[kBlockFloatBlock] = {};  // zero padding past the end of the row
    const int64_t n = std::min(kBlockFloatBlock, cols - b * kBlockFloatBlock);
    std::memcpy(bits, src + b * kBlockFloatBlock, n * sizeof(float));
    uint32_t shared_exp = 0;
    for (int j = 0; j < n; j++) {
      const uint32_t exp = (bits[j] >> 23) & 0xFF;
      if (exp == 0xFF) {
        throw Error("block-float conversion: non-finite value at column " +
                    std::to_string(b * kBlockFloatBlock + j));
      }
      shared_exp = std::max(shared_exp, exp);
    }
    dst[b] = uint8_t(shared_exp);
    uint8_t* out = payload + b * BF::payload_bytes;
    if constexpr (MagBits == 7) {
      for (int j = 0; j < 16; j++) out[j] = uint8_t(int8_t(encode<7>(bits[j], shared_exp)));
    } else {
      for (int j = 0; j < 8; j++) {
        const int low = encode<3>(bits[j], shared_exp), high = encode<3>(bits[j + 8], shared_exp);
        out[j] = uint8_t((low & 0xF) | (high & 0xF) << 4);
      }
    }
  }
}

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
    quantize_row<7>(src, cols, dst);
  } else {
    quantize_row<3>(src, cols, dst);
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
