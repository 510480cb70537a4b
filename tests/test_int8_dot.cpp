// The int8 activation path (int8_dot.h): the quantizer against its stated bounds, and each ISA's
// block-float × int8 kernels against a double-precision dot of the exact weights with the
// dequantized activations (q * scale), on awkward lengths and several rows at once.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "backends/cpu/int8_dot.h"
#include "error.h"
#include "support/random_weights.h"

using afm::WeightFormat;
using afm::cpu::Isa;

namespace {

constexpr WeightFormat kBlockFormats[] = {WeightFormat::BFP8, WeightFormat::BFP4};

std::vector<float> random_rows(int64_t rows, int64_t k, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> scale_exp(-6, 6);
  std::vector<float> x(rows * k);
  for (int64_t i = 0; i < rows * k; i++) x[i] = normal(rng) * std::ldexp(1.0f, scale_exp(rng));
  for (int64_t i = 16; i < std::min<int64_t>(32, k); i++) x[i] = 0;  // an all-zero block in row 0
  return x;
}

class Int8QuantizeIsa : public testing::TestWithParam<Isa> {};

TEST_P(Int8QuantizeIsa, RoundsEachBlockWithinHalfAStep) {
  const Isa isa = GetParam();
  if (!afm::cpu::isa_supported(isa)) GTEST_SKIP() << "CPU has no " << afm::cpu::isa_name(isa);
  std::mt19937 rng(3);
  for (WeightFormat f : kBlockFormats) {
    for (int64_t k : {1, 15, 16, 17, 64, 65, 300}) {
      const int64_t rows = 3;
      const std::vector<float> x = random_rows(rows, k, rng);
      afm::cpu::Int8Rows q, scalar;
      afm::cpu::quantize_int8_rows(f, x.data(), rows, k, q, nullptr, isa);
      afm::cpu::quantize_int8_rows(f, x.data(), rows, k, scalar, nullptr, Isa::Scalar);
      EXPECT_EQ(q.q, scalar.q) << "every ISA rounds alike";
      EXPECT_EQ(q.scale, scalar.scale);
      ASSERT_EQ(q.padded % 64, 0);
      ASSERT_GE(q.padded, k);
      const int offset = f == WeightFormat::BFP8 ? 128 : 8;
      for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < q.padded; i++) {
          const int64_t b = i / 16;
          double max_abs = 0;
          for (int64_t j = b * 16; j < std::min(k, b * 16 + 16); j++) max_abs = std::max(max_abs, std::fabs(double(x[r * k + j])));
          const float scale = q.scale[r * q.padded / 16 + b];
          const int v = q.q[r * q.padded + i];
          ASSERT_LE(std::abs(v), 127);
          if (i >= k) {
            ASSERT_EQ(v, 0) << "padding must be zero";
            continue;
          }
          EXPECT_NEAR(scale, max_abs / 127, max_abs * 1e-7);
          EXPECT_NEAR(double(v) * scale, x[r * k + i], 0.5 * scale * (1 + 1e-5) + 1e-30) << "k=" << k << " i=" << i;
        }
        for (int64_t j = 0; j < q.padded / 4; j++) {
          const int8_t* v = q.q.data() + r * q.padded + 4 * j;
          EXPECT_EQ(q.offset_sums[r * q.padded / 4 + j], -offset * (v[0] + v[1] + v[2] + v[3]));
        }
        for (int64_t b = 0; b < q.padded / 16; b++) {
          int32_t sum = 0;
          for (int64_t i = 16 * b; i < 16 * b + 16; i++) sum += q.q[r * q.padded + i];
          EXPECT_EQ(q.block_offset_sums[r * q.padded / 16 + b], -offset * sum);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Int8Quantize, Int8QuantizeIsa, testing::ValuesIn(afm::cpu::kAllIsas),
                         [](const testing::TestParamInfo<Isa>& info) { return afm::cpu::isa_name(info.param); });

// Crafted blocks every ISA must quantize to the same bytes: ties (round half to even), a block
// too small to scale (zeros), and blocks holding a NaN or an infinity (NaN scale, zero values).
TEST_P(Int8QuantizeIsa, TiesTinyAndNonFiniteBlocks) {
  const Isa isa = GetParam();
  if (!afm::cpu::isa_supported(isa)) GTEST_SKIP() << "CPU has no " << afm::cpu::isa_name(isa);
  std::vector<float> x(5 * 16, 0.0f);
  const float ties[] = {127.0f, 0.5f, 1.5f, 2.5f, -2.5f, -0.5f, 126.5f, -127.0f};
  std::copy(std::begin(ties), std::end(ties), x.begin());
  for (int i = 16; i < 32; i++) x[i] = 1e-40f * float(i);  // subnormal
  x[33] = std::numeric_limits<float>::quiet_NaN();
  x[34] = 1.0f;
  x[50] = -std::numeric_limits<float>::infinity();
  x[64] = 3.0f;  // a normal last block after them
  afm::cpu::Int8Rows q;
  afm::cpu::quantize_int8_rows(WeightFormat::BFP8, x.data(), 1, 65, q, nullptr, isa);
  const int8_t expected_ties[] = {127, 0, 2, 2, -2, 0, 126, -127};
  for (int i = 0; i < 8; i++) EXPECT_EQ(q.q[i], expected_ties[i]) << "value " << ties[i];
  EXPECT_EQ(q.scale[0], 1.0f);
  EXPECT_EQ(q.scale[1], 0.0f) << "a subnormal block is zeros";
  EXPECT_TRUE(std::isnan(q.scale[2]));
  EXPECT_TRUE(std::isnan(q.scale[3]));
  EXPECT_EQ(q.scale[4], 3.0f / 127.0f);
  for (int i = 16; i < 64; i++) EXPECT_EQ(q.q[i], 0) << i;
  EXPECT_EQ(q.q[64], 127);
  for (int64_t b = 0; b < q.padded / 16; b++) {
    int32_t sum = 0;
    for (int64_t i = 16 * b; i < 16 * b + 16; i++) sum += q.q[i];
    EXPECT_EQ(q.block_offset_sums[b], -128 * sum) << "block " << b;
  }
}

class Int8DotIsa : public testing::TestWithParam<Isa> {};

TEST_P(Int8DotIsa, MatchesExactDotOfDequantizedActivations) {
  const Isa isa = GetParam();
  if (!afm::cpu::isa_supported(isa)) GTEST_SKIP() << "CPU has no " << afm::cpu::isa_name(isa);
  std::mt19937 rng(17);
  for (WeightFormat f : kBlockFormats) {
    for (int64_t k : {1, 15, 16, 17, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 2560, 4099}) {
      const afm::test::Row row = afm::test::make_row(f, k, rng);
      // The row ends where its buffer does, so reading past it would trip sanitizers.
      const std::vector<uint8_t> w(row.bytes);
      const std::vector<float> x = random_rows(afm::cpu::kMaxDotRows + 1, k, rng);
      afm::cpu::Int8Rows q;
      afm::cpu::quantize_int8_rows(f, x.data(), afm::cpu::kMaxDotRows + 1, k, q);
      for (int n_x = 1; n_x <= afm::cpu::kMaxDotRows; n_x++) {
        const int64_t first = 1;  // not the first row, so row offsets are exercised
        std::vector<float> out(n_x + 1, 77.0f);
        afm::cpu::int8_dot_kernel(f, isa)(w.data(), q, first, n_x, out.data());
        EXPECT_EQ(out[n_x], 77.0f) << "wrote past out[n_x]";
        for (int j = 0; j < n_x; j++) {
          double ref = 0, abs_sum = 0;
          for (int64_t i = 0; i < k; i++) {
            const int64_t r = first + j;
            const double xi = double(q.q[r * q.padded + i]) * q.scale[r * q.padded / 16 + i / 16];
            ref += row.values[i] * xi;
            abs_sum += std::fabs(row.values[i] * xi);
          }
          // Block sums are exact integers; only the f32 scaling and summation round.
          const double tol = (k / 16 + 4) * 0x1p-22 * abs_sum + 1e-30;
          EXPECT_NEAR(out[j], ref, tol) << afm::format_name(f) << " k=" << k << " n_x=" << n_x << " row " << j;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Int8Dot, Int8DotIsa, testing::ValuesIn(afm::cpu::kAllIsas),
                         [](const testing::TestParamInfo<Isa>& info) { return afm::cpu::isa_name(info.param); });

TEST(Int8Dot, RejectsOtherFormatsAndRowCounts) {
  EXPECT_THROW(afm::cpu::int8_dot_kernel(WeightFormat::BF16), afm::Error);
  afm::cpu::Int8Rows q;
  const float x[16] = {};
  EXPECT_THROW(afm::cpu::quantize_int8_rows(WeightFormat::F32, x, 1, 16, q), afm::Error);
  afm::cpu::quantize_int8_rows(WeightFormat::BFP8, x, 1, 16, q);
  const uint8_t w[17] = {};
  float out[8];
  for (Isa isa : afm::cpu::kAllIsas) {
    if (!afm::cpu::isa_supported(isa)) continue;
    EXPECT_THROW(afm::cpu::int8_dot_kernel(WeightFormat::BFP8, isa)(w, q, 0, 0, out), afm::Error);
    EXPECT_THROW(afm::cpu::int8_dot_kernel(WeightFormat::BFP8, isa)(w, q, 0, 5, out), afm::Error);
  }
}

}  // namespace
