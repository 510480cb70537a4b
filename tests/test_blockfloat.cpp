// bfp8 / bfp4 conversion against hand-computed bytes, plus round-trip bounds on random rows.
// Notation: a normal fp32 value is 1.f * 2^(E-127); its 24-bit mantissa m24 has the hidden bit at
// bit 23. With shared exponent S, the code is round(m24 >> (S-E), to 24-B bits dropped) where
// B = 7 (bfp8) / 3 (bfp4): drop 17 / 21 bits, tie = 0x10000 / 0x100000. Worth: mag * 2^(S-127-(B-1)).
// Stored: signed magnitudes in two's complement, bfp8 as int8 bytes, bfp4 as nibbles (-1 = 0xF).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "blockfloat.h"
#include "error.h"

using afm::WeightFormat;

namespace {

// The quantizer under test: each test that quantizes runs once per version (the portable loop,
// AVX-512's and AVX2's), against the same hand-computed bytes and references.
afm::Quantizer quantizer = afm::Quantizer::Best;

const char* quantizer_name(afm::Quantizer q) {
  return q == afm::Quantizer::Portable ? "portable" : q == afm::Quantizer::Avx512 ? "avx512" : "avx2";
}

class BlockFloatQuantizer : public testing::TestWithParam<afm::Quantizer> {
 protected:
  void SetUp() override {
    if (!afm::quantizer_supported(GetParam())) GTEST_SKIP() << "this CPU lacks the ISA of " << quantizer_name(GetParam());
    quantizer = GetParam();
  }
};

std::vector<uint8_t> quantize(WeightFormat f, const std::vector<float>& src) {
  std::vector<uint8_t> out(afm::block_float_row_bytes(f, int64_t(src.size())), 0xEE);
  afm::block_float_quantize_row(f, src.data(), int64_t(src.size()), out.data(), quantizer);
  return out;
}

std::vector<float> dequantize(WeightFormat f, const std::vector<uint8_t>& row, int64_t cols) {
  std::vector<float> out(cols + 1, 123.0f);  // one sentinel past the end
  afm::block_float_dequantize_row(f, row.data(), cols, out.data());
  EXPECT_EQ(out[cols], 123.0f) << "wrote past the end of the row";
  out.pop_back();
  return out;
}

std::vector<float> block(std::initializer_list<float> head) {
  std::vector<float> v(head);
  v.resize(16, 0.0f);
  return v;
}

float bits(uint32_t b) { return std::bit_cast<float>(b); }

void expect_values(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); i++) {
    EXPECT_EQ(got[i], want[i]) << "value " << i;
    EXPECT_EQ(std::signbit(got[i]), std::signbit(want[i])) << "sign of value " << i;
  }
}

TEST(BlockFloat, RowBytes) {
  EXPECT_EQ(afm::block_float_row_bytes(WeightFormat::BFP8, 2560), 2720);  // 160 * (1 + 16): 8.5 bits
  EXPECT_EQ(afm::block_float_row_bytes(WeightFormat::BFP4, 2560), 1440);  // 160 * (1 + 8): 4.5 bits
  EXPECT_EQ(afm::block_float_row_bytes(WeightFormat::BFP8, 20), 34);      // padded to 2 blocks
  EXPECT_EQ(afm::block_float_row_bytes(WeightFormat::BFP4, 20), 18);
  EXPECT_EQ(afm::block_float_row_bytes(WeightFormat::BFP8, 0), 0);
  EXPECT_THROW(afm::block_float_row_bytes(WeightFormat::BF16, 16), afm::Error);
}

TEST(BlockFloat, ScaleTables) {
  EXPECT_EQ(afm::Bfp8::scale[0], 0.0f);
  EXPECT_EQ(afm::Bfp8::scale[127], 0x1p-6f);
  EXPECT_EQ(afm::Bfp4::scale[127], 0x1p-2f);
  EXPECT_EQ(afm::Bfp8::scale[1], 0x1p-132f);  // an fp32 subnormal
  EXPECT_EQ(afm::Bfp8::scale[255], 0x1p122f);
}

// Powers of two; the largest is 4 = 2^2, so S = 129.
// bfp8: 4 -> 0x800000>>17 = 64; 2 -> 32; 1 -> 16; ... 2^-4 -> 1. 2^-5: 0x800000>>7 = 0x10000
// is exactly the tie and 0 is even, so 0; 2^-6 is below the tie: 0. Worth: mag * 2^-4.
// bfp4: 4 -> 0x800000>>21 = 4; 2 -> 2; 1 -> 1; 0.5: 0x100000 is the tie, 0 is even: 0. Worth: mag.
TEST_P(BlockFloatQuantizer, PowersOfTwo) {
  const auto src = block({4, 2, 1, 0.5f, 0.25f, 0.125f, 0.0625f, 0.03125f, 0.015625f, -4, -1});
  const std::vector<uint8_t> bfp8 = {129,  0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01, 0x00,
                                     0x00, 0xC0, 0xF0, 0,    0,    0,    0,    0};  // -64, -16
  EXPECT_EQ(quantize(WeightFormat::BFP8, src), bfp8);
  expect_values(dequantize(WeightFormat::BFP8, bfp8, 16),
                block({4, 2, 1, 0.5f, 0.25f, 0.125f, 0.0625f, 0, 0, -4, -1}));
  // bfp4 codes 0..7: 4 2 1 0 0 0 0 0; codes 8..15: 0, -4 = 0xC, -1 = 0xF, 0...; byte j = c[j] | c[j+8] << 4.
  const std::vector<uint8_t> bfp4 = {129, 0x04, 0xC2, 0xF1, 0, 0, 0, 0, 0};
  EXPECT_EQ(quantize(WeightFormat::BFP4, src), bfp4);
  expect_values(dequantize(WeightFormat::BFP4, bfp4, 16), block({4, 2, 1, 0, 0, 0, 0, 0, 0, -4, -1}));
}

// Mixed signs and exponents; 3 = 1.5 * 2^1 and 2.5 = 1.25 * 2^1 are the largest, S = 128.
//   3      m24 0xC00000            bfp8 96 (0x60)            bfp4 6
//   -0.75  0xC00000>>2 = 0x300000  bfp8 -24 = 0xE8           bfp4 1 + tie, 1 odd -> 2: -2 = 0xE
//   0.1f   0xCCCCCD>>5 = 0x66666   bfp8 3 (rest 0x6666)      bfp4 0 (rest < tie)
//   -1e-3f E = 117, >>11 < 0x10000 bfp8 0, and no sign       bfp4 0
//   q      0x820001>>1 = 0x410000  bfp8 32 + tie, even: 32   bfp4 2
//   2.5    m24 0xA00000            bfp8 80 (0x50)            bfp4 5
//   -2^-5  0x800000>>6 = 0x20000   bfp8 -1 = 0xFF            bfp4 0, no sign
//   0.046875 = 1.5*2^-5: 0x30000   bfp8 1 + tie, odd -> 2    bfp4 0
// q = 1 + 2^-6 + 2^-23 (0x3F820001) is 32.5000038 steps: exact rounding gives 33, but tt-metal
// shifts (dropping the 2^-23 bit) before rounding, leaving a tie that goes to even: 32.
// Worth: bfp8 mag / 32, bfp4 mag / 2.
TEST_P(BlockFloatQuantizer, MixedBlock) {
  const auto src = block({3, -0.75f, 0.1f, -1e-3f, bits(0x3F820001), 2.5f, -0.03125f, 0.046875f});
  const std::vector<uint8_t> bfp8 = {128, 0x60, 0xE8, 0x03, 0x00, 0x20, 0x50, 0xFF, 0x02,
                                     0,   0,    0,    0,    0,    0,    0,    0};
  EXPECT_EQ(quantize(WeightFormat::BFP8, src), bfp8);
  expect_values(dequantize(WeightFormat::BFP8, bfp8, 16),
                block({3, -0.75f, 0.09375f, 0, 1, 2.5f, -0.03125f, 0.0625f}));
  const std::vector<uint8_t> bfp4 = {128, 0x06, 0x0E, 0x00, 0x00, 0x02, 0x05, 0x00, 0x00};
  EXPECT_EQ(quantize(WeightFormat::BFP4, src), bfp4);
  expect_values(dequantize(WeightFormat::BFP4, bfp4, 16), block({3, -1, 0, 0, 1, 2.5f, 0, 0}));
}

// 1.99999988 (0x3FFFFFFF, m24 0xFFFFFF) has S = 127. bfp8: 0xFFFFFF>>17 = 127, rest 0x1FFFF
// rounds up to 128, which saturates to 127 = 0x7F (-127 = 0x81; no carry into the exponent): worth
// 127/64 = 1.984375. bfp4: >>21 = 7, rounds up to 8, saturates to 7 (-7 = 0x9): worth 7/4 = 1.75.
// 1.9375 (m24 0xF80000) also saturates in bfp4 (7 + rest 0x180000 > tie). 1 -> 64 / 4.
TEST_P(BlockFloatQuantizer, RoundingSaturates) {
  const auto src = block({bits(0x3FFFFFFF), bits(0xBFFFFFFF), 1, 1.9375f});
  const std::vector<uint8_t> bfp8 = {127, 0x7F, 0x81, 0x40, 0x7C, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(quantize(WeightFormat::BFP8, src), bfp8);  // 1.9375 = 124/64 exactly
  expect_values(dequantize(WeightFormat::BFP8, bfp8, 16), block({1.984375f, -1.984375f, 1, 1.9375f}));
  const std::vector<uint8_t> bfp4 = {127, 0x07, 0x09, 0x04, 0x07, 0, 0, 0, 0};
  EXPECT_EQ(quantize(WeightFormat::BFP4, src), bfp4);
  expect_values(dequantize(WeightFormat::BFP4, bfp4, 16), block({1.75f, -1.75f, 1, 1.75f}));
}

// Zeros of either sign store magnitude 0 without a sign, and an all-zero block stores S = 0.
TEST_P(BlockFloatQuantizer, Zeros) {
  const auto src = block({-0.0f, 0.0f, -0.0f});
  for (WeightFormat f : {WeightFormat::BFP8, WeightFormat::BFP4}) {
    const auto q = quantize(f, src);
    EXPECT_EQ(q, std::vector<uint8_t>(q.size(), 0));
    expect_values(dequantize(f, q, 16), block({}));
  }
}

// fp32 subnormals (E = 0) flush to 0 and do not count for S. Here S = 2 (2^-125):
//   2^-126 (0x00800000): 0x800000>>1 >> 17 = 32; 1.5 * 2^-126: 0xC00000>>1 >> 17 = 48; 2^-125: 64.
// Worth mag * 2^(2-133) = mag * 2^-131, itself an fp32 subnormal, exact for every magnitude.
TEST_P(BlockFloatQuantizer, Subnormals) {
  const auto src = block({bits(0x00000001), bits(0x80400000), bits(0x00800000), -0.0f, bits(0x80C00000),
                          bits(0x01000000)});
  const std::vector<uint8_t> bfp8 = {2, 0x00, 0x00, 0x20, 0x00, 0xD0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};  // -48
  EXPECT_EQ(quantize(WeightFormat::BFP8, src), bfp8);
  expect_values(dequantize(WeightFormat::BFP8, bfp8, 16),
                block({0, 0, 0x1p-126f, 0, -0x1.8p-126f, 0x1p-125f}));
  // bfp4: 2^-126 -> 0x400000>>21 = 2; -1.5 * 2^-126 -> -3 = 0xD; 2^-125 -> 4. Worth mag * 2^-127.
  const std::vector<uint8_t> bfp4 = {2, 0x00, 0x00, 0x02, 0x00, 0x0D, 0x04, 0, 0};
  EXPECT_EQ(quantize(WeightFormat::BFP4, src), bfp4);
  expect_values(dequantize(WeightFormat::BFP4, bfp4, 16),
                block({0, 0, 0x1p-126f, 0, -0x1.8p-126f, 0x1p-125f}));
}

// 20 columns: block 0 is sixteen 1s (S = 127, bfp8 64 / bfp4 4), block 1 holds -2, 0.5, 0.25, 3
// (S = 128) and 12 zeros of padding. bfp8: -2 -> -64 = 0xC0, 0.5 -> 0x200000>>17 = 16,
// 0.25 -> 8, 3 -> 96. bfp4: -2 -> -4 = 0xC, 0.5 -> 1, 0.25 -> 0x100000 tie, even: 0, 3 -> 6.
TEST_P(BlockFloatQuantizer, PartialLastBlock) {
  std::vector<float> src(16, 1.0f);
  src.insert(src.end(), {-2, 0.5f, 0.25f, 3});
  std::vector<uint8_t> bfp8(2 + 16 + 16, 0);  // exponents, block 0, block 1 (zero padded)
  bfp8[0] = 127;
  bfp8[1] = 128;
  std::fill_n(bfp8.begin() + 2, 16, 0x40);
  bfp8[18] = 0xC0;
  bfp8[19] = 0x10;
  bfp8[20] = 0x08;
  bfp8[21] = 0x60;
  EXPECT_EQ(quantize(WeightFormat::BFP8, src), bfp8);
  expect_values(dequantize(WeightFormat::BFP8, bfp8, 20), src);

  std::vector<uint8_t> bfp4(2 + 8 + 8, 0);
  bfp4[0] = 127;
  bfp4[1] = 128;
  std::fill_n(bfp4.begin() + 2, 8, 0x44);
  bfp4[10] = 0x0C;
  bfp4[11] = 0x01;
  bfp4[13] = 0x06;
  EXPECT_EQ(quantize(WeightFormat::BFP4, src), bfp4);
  std::vector<float> want = src;
  want[18] = 0;
  expect_values(dequantize(WeightFormat::BFP4, bfp4, 20), want);
}

TEST_P(BlockFloatQuantizer, RejectsNonFinite) {
  for (WeightFormat f : {WeightFormat::BFP8, WeightFormat::BFP4}) {
    EXPECT_THROW(quantize(f, block({1, std::numeric_limits<float>::infinity()})), afm::Error);
    EXPECT_THROW(quantize(f, block({std::numeric_limits<float>::quiet_NaN()})), afm::Error);
    // In a later, partial block: the error names the column.
    std::vector<float> row(40, 0.5f);
    row[37] = -std::numeric_limits<float>::infinity();
    try {
      quantize(f, row);
      ADD_FAILURE() << "an infinite value was quantized";
    } catch (const afm::Error& e) {
      EXPECT_NE(std::string(e.what()).find("non-finite value at column 37"), std::string::npos) << e.what();
    }
  }
}

// Every value comes back within M / (2^B - 1/2) of itself, M the block's largest |value|
// (derivation in blockfloat.h); re-quantizing the result reproduces the same bytes.
TEST_P(BlockFloatQuantizer, RandomRoundTrip) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> scale_exp(-40, 40);
  const int64_t cols = 16 * 64 + 9;
  std::vector<float> src(cols);
  for (int64_t b = 0; b < cols; b += 16) {
    const float scale = std::ldexp(1.0f, scale_exp(rng));  // blocks of very different sizes
    for (int64_t i = b; i < std::min(b + 16, cols); i++) src[i] = normal(rng) * scale;
  }
  for (auto [f, mag_bits] : {std::pair{WeightFormat::BFP8, 7}, std::pair{WeightFormat::BFP4, 3}}) {
    const auto q = quantize(f, src);
    const auto back = dequantize(f, q, cols);
    double worst = 0;  // largest error / M seen
    for (int64_t b = 0; b < cols; b += 16) {
      const int64_t end = std::min(b + 16, cols);
      float max_abs = 0;
      for (int64_t i = b; i < end; i++) max_abs = std::max(max_abs, std::fabs(src[i]));
      const double bound = max_abs / (std::ldexp(1.0, mag_bits) - 0.5);
      for (int64_t i = b; i < end; i++) {
        const double err = std::fabs(double(src[i]) - back[i]);
        EXPECT_LE(err, bound) << "mag_bits " << mag_bits << " column " << i;
        worst = std::max(worst, err / max_abs);
      }
    }
    EXPECT_GT(worst, 0.5 / std::ldexp(1.0, mag_bits));  // the bound is not loose by 2x
    EXPECT_EQ(quantize(f, back), q);
  }
}

// The same rule as a plain per-value reference written from blockfloat.h's description (not the
// vectorized code), over a million random bit patterns: every exponent, subnormals, zeros of
// both signs, and blocks that mix magnitudes so shifts of 0 to 31 and beyond all occur.
uint32_t reference_code(uint32_t x, uint32_t shared, int mag_bits) {
  const uint32_t e = (x >> 23) & 0xFF;
  if (e == 0) return 0;
  const int drop = 24 - mag_bits;
  const uint32_t m = ((x & 0x7FFFFF) | 0x800000) >> std::min<uint32_t>(shared - e, 31);
  uint32_t mag = m >> drop;
  const uint32_t rest = m & ((1u << drop) - 1), tie = 1u << (drop - 1);
  if (rest > tie || (rest == tie && (mag & 1))) mag++;
  mag = std::min(mag, (1u << mag_bits) - 1);
  const int v = x >> 31 ? -int(mag) : int(mag);
  return uint32_t(v) & ((1u << (mag_bits + 1)) - 1);  // two's complement in B + 1 bits
}

TEST_P(BlockFloatQuantizer, MatchesThePerValueRuleOnRandomBitPatterns) {
  std::mt19937 rng(99);
  const int64_t cols = 16 * 4096;
  std::vector<float> src(cols);
  for (int64_t b = 0; b < cols; b += 16) {
    const uint32_t base = rng() % 254;  // this block's largest exponent is near base
    for (int64_t i = b; i < b + 16; i++) {
      uint32_t e = rng() % 4 == 0 ? 0 : uint32_t(std::max<int>(0, int(base) - int(rng() % 40)));
      src[i] = bits((rng() & 0x807FFFFFu) | std::min<uint32_t>(e, 254) << 23);
    }
  }
  for (auto [f, mag_bits] : {std::pair{WeightFormat::BFP8, 7}, std::pair{WeightFormat::BFP4, 3}}) {
    const auto q = quantize(f, src);
    const int64_t nb = cols / 16;
    for (int64_t b = 0; b < nb; b++) {
      uint32_t shared = 0;
      for (int j = 0; j < 16; j++) shared = std::max(shared, (std::bit_cast<uint32_t>(src[b * 16 + j]) >> 23) & 0xFF);
      ASSERT_EQ(q[b], shared) << "block " << b;
      for (int j = 0; j < 16; j++) {
        const uint32_t want = reference_code(std::bit_cast<uint32_t>(src[b * 16 + j]), shared, mag_bits);
        const uint32_t got = mag_bits == 7 ? q[nb + b * 16 + j] : (q[nb + b * 8 + (j & 7)] >> (j < 8 ? 0 : 4)) & 0xF;
        ASSERT_EQ(got, want) << "block " << b << " value " << j << " mag_bits " << mag_bits;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Versions, BlockFloatQuantizer,
                         testing::Values(afm::Quantizer::Portable, afm::Quantizer::Avx512, afm::Quantizer::Avx2),
                         [](const testing::TestParamInfo<afm::Quantizer>& info) { return quantizer_name(info.param); });

}  // namespace
