#include "ggml_quants.h"

#include <cstring>
#include <string>

#include "error.h"
#include "numeric.h"

// Each block is unpacked into its small integer quants (int8, scale and offset not yet applied),
// then scaled group by group. The formulas follow gguf-py's numpy dequantizers operation for
// operation: the f16 fields widened to f32, then (d * scale) * q, then + m or - m. Every product
// is exact in f32 (an f16 has 11 significant bits, a scale at most 7, a quant at most 5: Q6_K's
// int8 scales and quants in -32..31), so only the final add or subtract rounds, and a compiler
// fusing it into an FMA would not change the bits.

namespace afm {
namespace {

float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Fields of `bits` bits: byte l of the n bytes at src holds quants l, n + l, 2n + l, ... from its
// low bits up. ggml spreads the fields of one byte over sub-blocks rather than packing neighbours.
template <int bits>
void unpack(const uint8_t* src, int n, int8_t* q) {
  constexpr int mask = (1 << bits) - 1;
  for (int f = 0; f < 8 / bits; f++)
    for (int l = 0; l < n; l++) q[f * n + l] = int8_t((src[l] >> (f * bits)) & mask);
}

enum class Offset { none, add, subtract };

// y = d * q, (d * q) + m or (d * q) - m for n quants that share d and m.
template <Offset offset>
void scale(const int8_t* q, int n, float d, float m, float* y) {
  for (int i = 0; i < n; i++) {
    const float dq = d * float(q[i]);
    if constexpr (offset == Offset::none) y[i] = dq;
    if constexpr (offset == Offset::add) y[i] = dq + m;
    if constexpr (offset == Offset::subtract) y[i] = dq - m;
  }
}

// Q4_0, Q4_1, Q5_0, Q5_1: f16 d, for _1 an f16 offset m, for Q5 a 32-bit word whose bit i is the
// fifth bit of quant i, then 16 bytes of nibbles (quants 0-15 low, 16-31 high). Without m the
// quants are centred: q - 8 or q - 16.
template <bool has_min, bool has_fifth_bit>
void dequantize_legacy(const uint8_t* block, float* y) {
  const float d = half(block);
  const float m = has_min ? half(block + 2) : 0.0f;
  const uint8_t* qh = block + (has_min ? 4 : 2);
  const uint8_t* qs = qh + (has_fifth_bit ? 4 : 0);
  int8_t q[32];
  unpack<4>(qs, 16, q);
  if constexpr (has_fifth_bit) {
    uint32_t h;
    std::memcpy(&h, qh, 4);
    for (int i = 0; i < 32; i++) q[i] = int8_t(q[i] | ((h >> i) & 1) << 4);
  }
  if constexpr (has_min) {
    scale<Offset::add>(q, 32, d, m, y);
  } else {
    for (int i = 0; i < 32; i++) q[i] = int8_t(q[i] - (has_fifth_bit ? 16 : 8));
    scale<Offset::none>(q, 32, d, 0.0f, y);
  }
}

// Q8_0: f16 d, then 32 int8 quants.
void dequantize_q8_0(const uint8_t* block, float* y) {
  scale<Offset::none>(reinterpret_cast<const int8_t*>(block + 2), 32, half(block), 0.0f, y);
}

// Q2_K: 16 bytes of 4-bit scale (low) and min (high) per 16 quants, 64 bytes of 2-bit quants (two
// halves of 32 bytes), f16 d, f16 dmin. y = (d * scale) * q - (dmin * min).
void dequantize_q2_k(const uint8_t* block, float* y) {
  const uint8_t* scales = block;
  const float d = half(block + 80), dmin = half(block + 82);
  int8_t q[256];
  unpack<2>(block + 16, 32, q);
  unpack<2>(block + 48, 32, q + 128);
  for (int g = 0; g < 16; g++)
    scale<Offset::subtract>(q + 16 * g, 16, d * float(scales[g] & 0xF), dmin * float(scales[g] >> 4), y + 16 * g);
}

// Q3_K: 32 bytes of high bits (bit s of byte l for quant 32s + l), 64 bytes of 2-bit low bits, 12
// bytes of 6-bit scales (low nibbles in bytes 0-7, high 2 bits in bytes 8-11, offset by 32), f16 d.
// A quant is its low bits minus 4 when its high bit is clear.
void dequantize_q3_k(const uint8_t* block, float* y) {
  const uint8_t* packed_scales = block + 96;
  const float d = half(block + 108);
  int8_t low[16], high[16];
  unpack<4>(packed_scales, 8, low);
  unpack<2>(packed_scales + 8, 4, high);
  int8_t q[256], h[256];
  unpack<2>(block + 32, 32, q);
  unpack<2>(block + 64, 32, q + 128);
  unpack<1>(block, 32, h);
  for (int i = 0; i < 256; i++) q[i] = int8_t(q[i] - ((h[i] ^ 1) << 2));
  for (int g = 0; g < 16; g++)
    scale<Offset::none>(q + 16 * g, 16, d * float((low[g] | high[g] << 4) - 32), 0.0f, y + 16 * g);
}

// Q4_K, Q5_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, for Q5 32
// bytes of fifth bits (as Q3_K's high bits), then 128 bytes of nibbles: each 32 bytes hold two
// sub-blocks, low nibbles first. y = (d * scale) * q - (dmin * min).
template <bool has_fifth_bit>
void dequantize_q4_k_q5_k(const uint8_t* block, float* y) {
  const float d = half(block), dmin = half(block + 2);
  // Bytes 0-3 hold scales 0-3 and the top bits of scales 4-7, bytes 4-7 the same for mins, bytes
  // 8-11 the low nibbles of scales 4-7 (low) and mins 4-7 (high).
  const uint8_t* s = block + 4;
  uint8_t scales[8], mins[8];
  for (int j = 0; j < 4; j++) {
    scales[j] = s[j] & 0x3F;
    mins[j] = s[j + 4] & 0x3F;
    scales[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
    mins[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
  }
  const uint8_t* qs = block + (has_fifth_bit ? 48 : 16);
  int8_t q[256];
  for (int c = 0; c < 4; c++) unpack<4>(qs + 32 * c, 32, q + 64 * c);
  if constexpr (has_fifth_bit) {
    int8_t h[256];
    unpack<1>(block + 16, 32, h);
    for (int i = 0; i < 256; i++) q[i] = int8_t(q[i] | h[i] << 4);
  }
  for (int j = 0; j < 8; j++)
    scale<Offset::subtract>(q + 32 * j, 32, d * float(scales[j]), dmin * float(mins[j]), y + 32 * j);
}

// Q6_K: 128 bytes of low nibbles (each 64 bytes hold two runs of 64 quants), 64 bytes of high 2-bit
// pairs (each 32 bytes hold four runs of 32), 16 int8 scales per 16 quants, f16 d. Quants are
// centred: q - 32.
void dequantize_q6_k(const uint8_t* block, float* y) {
  const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192);
  const float d = half(block + 208);
  int8_t q[256], h[256];
  for (int half_block = 0; half_block < 2; half_block++) {
    unpack<4>(block + 64 * half_block, 64, q + 128 * half_block);
    unpack<2>(block + 128 + 32 * half_block, 32, h + 128 * half_block);
  }
  for (int i = 0; i < 256; i++) q[i] = int8_t((q[i] | h[i] << 4) - 32);
  for (int g = 0; g < 16; g++) scale<Offset::none>(q + 16 * g, 16, d * float(scales[g]), 0.0f, y + 16 * g);
}

using BlockFn = void (*)(const uint8_t* block, float* y);

BlockFn block_fn(DType type) {
  switch (type) {
    case DType::Q4_0: return dequantize_legacy<false, false>;
    case DType::Q4_1: return dequantize_legacy<true, false>;
    case DType::Q5_0: return dequantize_legacy<false, true>;
    case DType::Q5_1: return dequantize_legacy<true, true>;
    case DType::Q8_0: return dequantize_q8_0;
    case DType::Q2_K: return dequantize_q2_k;
    case DType::Q3_K: return dequantize_q3_k;
    case DType::Q4_K: return dequantize_q4_k_q5_k<false>;
    case DType::Q5_K: return dequantize_q4_k_q5_k<true>;
    case DType::Q6_K: return dequantize_q6_k;
    default: throw Error(std::string("cannot dequantize ") + dtype_name(type) + ": not a ggml block type");
  }
}

}  // namespace

void dequantize_ggml(DType type, const uint8_t* src, int64_t n, float* dst) {
  const BlockFn fn = block_fn(type);
  const BlockLayout block = dtype_block(type);
  if (n % block.values != 0)
    throw Error(std::string("cannot dequantize ") + std::to_string(n) + " values of " + dtype_name(type) +
                ": not a multiple of its block of " + std::to_string(block.values));
  for (int64_t b = 0; b < n / block.values; b++) fn(src + b * block.bytes, dst + b * block.values);
}

}  // namespace afm
