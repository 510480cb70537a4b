// Block-float weight formats: bfp8 (Tenstorrent's bfloat8_b) and bfp4 (bfloat4_b).
//
// Numbers. Each block of 16 consecutive values of a row shares one 8-bit exponent: the largest
// fp32 biased exponent in the block. Each value keeps a sign and a magnitude of B bits (B = 7
// for bfp8, 3 for bfp4) that includes the hidden bit, so a stored magnitude m in a block with
// shared exponent e is worth
//     m * 2^(e - 127 - (B - 1))        (bfp8: m * 2^(e - 133), bfp4: m * 2^(e - 129)).
// A zero magnitude never carries a sign, and a block whose values are all zero stores e = 0.
//
// Rounding follows tt-metal's convert_u32_to_bfp (bfloat8_b / bfloat4_b, no exponent rebias)
// bit for bit, so every shared exponent and magnitude matches what tt-metal would produce:
//   - fp32 zeros and subnormals (biased exponent 0) become magnitude 0 and do not raise the
//     shared exponent;
//   - the 24-bit mantissa (hidden bit set) is first shifted right by (shared - own exponent),
//     truncating, and only then rounded to B bits, to nearest with ties to even; the bits lost
//     by the first shift do not count towards rounding (so x = 32.5000038 * step becomes 32);
//   - a magnitude that rounds up to 2^B saturates at 2^B - 1 (127 / 7) instead of carrying
//     into the exponent.
// tt-metal does not check for inf/nan; we reject them (afm::Error), since a weight holding
// one is broken anyway.
// Round-trip error: with M the largest |x| in a block, every value comes back within
// M / (2^B - 1/2) (bfp8: M / 127.5, bfp4: M / 7.5), fp32 subnormals aside (flushed to 0).
// Why: the step is u = 2^(e-127-(B-1)) and M >= 2^(e-127) = 2^(B-1) u. A value that does not
// saturate is off by at most u/2 plus the truncated bits (< 2^-(24-B) u), i.e. <= M/(2^B-1/2).
// A value that saturates is >= (2^B - 1/2) u and < 2^B u, so it is off by < u <= M/(2^B-1/2).
//
// Packed row layout, chosen so SIMD decoding needs no gathers and reads two forward streams:
//     [exponent of block 0 .. exponent of block nb-1][payload of block 0 .. payload of block nb-1]
// with nb = ceil(cols / 16). bfp8 payload: 16 bytes, byte j = value j's signed magnitude as a
// two's-complement int8 (-127..127). bfp4 payload: 8 bytes, byte j holds value j's signed
// magnitude as a two's-complement nibble (-7..7) in its low half and value j + 8's in its high
// half. Both are tt-metal's sign|magnitude codes re-encoded (same information; tt-metal code =
// v < 0 ? sign_bit | -v : v), because two's complement widens to int32 with sign-extending
// loads and shifts (pmovsxbd; pslld/psrad for the nibbles) instead of extra mask/sign/table
// shuffles, which measured ~1.5x faster decoding; the nibble order puts 8 values in order in
// each half of the 8 bytes. That is 17 bytes / 16 values
// (8.5 bits) and 9 bytes / 16 values (4.5 bits). A row whose length is not a multiple of 16 has
// its last block padded with zeros (these neither raise the exponent nor decode to anything).
#pragma once
#include <array>
#include <bit>
#include <cstdint>

#include "weight.h"

namespace afm {

constexpr int64_t kBlockFloatBlock = 16;  // values sharing one exponent

bool is_block_float(WeightFormat format);
inline int64_t block_float_blocks(int64_t cols) { return (cols + kBlockFloatBlock - 1) / kBlockFloatBlock; }

// Bytes of one packed row of `cols` values. Throws afm::Error unless format is BFP8 or BFP4.
int64_t block_float_row_bytes(WeightFormat format, int64_t cols);
// The quantizer's versions, which give the same bytes: the portable loop (compiled per ISA), one
// in AVX-512 F/BW/VL and one in AVX2; Best takes the widest the CPU has.
enum class Quantizer { Best, Portable, Avx512, Avx2 };
bool quantizer_supported(Quantizer quantizer);

// Packs src[0..cols) into dst[0..block_float_row_bytes). Throws afm::Error on inf/nan, or for a
// quantizer this CPU lacks.
void block_float_quantize_row(WeightFormat format, const float* src, int64_t cols, uint8_t* dst,
                              Quantizer quantizer = Quantizer::Best);
// Unpacks a row into dst[0..cols).
void block_float_dequantize_row(WeightFormat format, const uint8_t* src, int64_t cols, float* dst);

// Decoding pieces, shared by the converter above and the dot kernels (backends/cpu/dot.cpp).
// MagBits = B above: 7 for bfp8, 3 for bfp4.
template <int MagBits>
struct BlockFloat {
  static constexpr int mag_bits = MagBits;
  static constexpr uint32_t mag_mask = (1u << MagBits) - 1;
  static constexpr int64_t payload_bytes = kBlockFloatBlock * (MagBits + 1) / 8;  // per block

  static int64_t row_bytes(int64_t cols) { return block_float_blocks(cols) * (1 + payload_bytes); }

  // scale[e] = 2^(e - 127 - (B - 1)), the worth of magnitude 1 under shared exponent e. It is an
  // fp32 subnormal for small e, which still multiplies exactly by any B-bit magnitude. scale[0]
  // is 0: a block with e = 0 only holds zero magnitudes.
  static constexpr std::array<float, 256> scale = [] {
    std::array<float, 256> table{};
    for (int e = 1; e < 256; e++) {
      const int p = e - 127 - (MagBits - 1);  // >= -132, <= 127
      table[e] = std::bit_cast<float>(p >= -126 ? uint32_t(p + 127) << 23 : 1u << (p + 149));
    }
    return table;
  }();

  // The signed magnitude of value j (0..15) of a block's payload.
  static int signed_magnitude(const uint8_t* payload, int j) {
    if constexpr (MagBits == 7) {
      return int8_t(payload[j]);
    } else {
      static_assert(MagBits == 3);
      const int byte = int8_t(payload[j & 7]);
      return j < 8 ? int8_t(byte << 4) >> 4 : byte >> 4;  // sign-extend the nibble
    }
  }

  // Value i of a packed row: `exps` is the row's start, `payloads` = exps + block_float_blocks(cols).
  // The portable, one-at-a-time decoder.
  static float value(const uint8_t* exps, const uint8_t* payloads, int64_t i) {
    const int64_t b = i / kBlockFloatBlock;
    return float(signed_magnitude(payloads + b * payload_bytes, int(i % kBlockFloatBlock))) * scale[exps[b]];
  }
};

using Bfp8 = BlockFloat<7>;
using Bfp4 = BlockFloat<3>;

}  // namespace afm
