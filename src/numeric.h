// Scalar conversions between the floating-point storage types that checkpoints use.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace afm {

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch does when it casts to bfloat16; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

inline float round_to_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// IEEE binary16 to binary32, exact, subnormals included.
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: value = mantissa * 2^-24
    float value = float(mantissa) * 0x1p-24f;
    std::memcpy(&bits, &value, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// f32 to IEEE binary16, rounded to nearest even; past the largest half (65504) it is infinity.
inline uint16_t f32_to_f16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
  const uint32_t mag = bits & 0x7fffffffu;
  if (mag > 0x7f800000u) return sign | 0x7e00u;      // NaN stays NaN
  if (mag >= 0x477ff000u) return sign | 0x7c00u;     // >= 65520 rounds to infinity
  if (mag < 0x38800000u) {                           // below 2^-14: a subnormal half, m * 2^-24
    const float scaled = std::bit_cast<float>(mag) * 0x1p24f;  // exact
    return sign | uint16_t(std::nearbyint(scaled));  // ties to even; 1024 carries into the exponent
  }
  uint32_t h = mag - (112u << 23);  // rebias the exponent from 127 to 15
  h += 0xfffu + ((h >> 13) & 1u);   // round the 13 dropped bits to nearest even
  return sign | uint16_t(h >> 13);
}

// splitmix64's output function: a counter hashed to 64 well-mixed bits. Random weights use
// mix64(key + i * kGolden) for value i, so any range can be made on its own, on any thread.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

}  // namespace afm
