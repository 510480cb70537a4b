// Dot kernels: every format x ISA x n_x x awkward k, against a double-precision dot of the
// decoded weights; each SIMD kernel must agree with the scalar one too. A SIMD ISA the CPU lacks
// is skipped, saying so.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/dot.h"
#include "blockfloat.h"
#include "error.h"
#include "support/random_weights.h"

using afm::WeightFormat;
using afm::cpu::Isa;

namespace {

using afm::test::make_row;
using afm::test::half_value;
using afm::test::Row;
constexpr auto& kFormats = afm::test::kAllWeightFormats;

constexpr auto& kIsas = afm::cpu::kAllIsas;

std::vector<Isa> isas() {
  std::vector<Isa> out;
  for (Isa isa : kIsas) {
    if (afm::cpu::isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

class DotIsa : public testing::TestWithParam<Isa> {};

TEST_P(DotIsa, AllFormatsAndShapes) {
  const Isa isa = GetParam();
  if (!afm::cpu::isa_supported(isa)) GTEST_SKIP() << "CPU has no " << afm::cpu::isa_name(isa);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  const int64_t ks[] = {0, 1, 5, 8, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 100, 255, 256, 257, 1000, 2560, 4099};
  for (WeightFormat f : kFormats) {
    for (int64_t k : ks) {
      const Row row = make_row(f, k, rng);
      // The weight row sits at an odd address, as a row inside a mapped file may, and ends where
      // the buffer does, so a kernel reading past it would trip sanitizers.
      std::vector<uint8_t> buffer(row.bytes.size() + 1);
      if (k > 0) std::memcpy(buffer.data() + 1, row.bytes.data(), row.bytes.size());
      const uint8_t* w = buffer.data() + 1;
      const int64_t stride = k + 3;  // activation rows unaligned too
      std::vector<float> x(afm::cpu::kMaxDotRows * stride);
      for (float& v : x) v = normal(rng);

      for (int n_x = 1; n_x <= afm::cpu::kMaxDotRows; n_x++) {
        std::vector<float> out(n_x + 1, 77.0f), scalar(n_x);
        afm::cpu::dot_kernel(f, isa)(w, x.data(), stride, n_x, k, out.data());
        EXPECT_EQ(out[n_x], 77.0f) << "wrote past out[n_x]";
        afm::cpu::dot_kernel(f, Isa::Scalar)(w, x.data(), stride, n_x, k, scalar.data());
        for (int j = 0; j < n_x; j++) {
          double ref = 0, abs_sum = 0;
          for (int64_t i = 0; i < k; i++) {
            const double p = row.values[i] * x[j * stride + i];
            ref += p;
            abs_sum += std::fabs(p);
          }
          // Weights decode exactly, so the only error is f32 summation: at most ~k ulps of sum |w x|.
          const double tol = (k + 2) * 0x1p-24 * abs_sum;
          EXPECT_NEAR(out[j], ref, tol) << afm::format_name(f) << " k=" << k << " n_x=" << n_x << " row " << j;
          EXPECT_NEAR(out[j], scalar[j], 2 * tol) << afm::format_name(f) << " vs scalar, k=" << k;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dot, DotIsa, testing::ValuesIn(kIsas),
                         [](const testing::TestParamInfo<Isa>& info) { return afm::cpu::isa_name(info.param); });

// The ISA is chosen per call, so each variant is reachable on a CPU that has it.
TEST(Dot, IsaSelection) {
  EXPECT_TRUE(afm::cpu::isa_supported(Isa::Scalar));
  EXPECT_TRUE(afm::cpu::isa_supported(afm::cpu::best_isa()));
  for (WeightFormat f : kFormats) {
    EXPECT_EQ(afm::cpu::dot_kernel(f), afm::cpu::dot_kernel(f, afm::cpu::best_isa()));
    for (Isa isa : kIsas) {
      if (!afm::cpu::isa_supported(isa)) {
        EXPECT_THROW(afm::cpu::dot_kernel(f, isa), afm::Error);
        continue;
      }
      for (Isa other : kIsas) {
        // Avx512Vnni adds instructions for the int8 kernels (int8_dot.h); its f32 ones are Avx512's.
        const bool same_dots = (isa == Isa::Avx512 && other == Isa::Avx512Vnni) ||
                               (isa == Isa::Avx512Vnni && other == Isa::Avx512);
        if (other != isa && afm::cpu::isa_supported(other) && !same_dots) {
          EXPECT_NE(afm::cpu::dot_kernel(f, isa), afm::cpu::dot_kernel(f, other));
        }
      }
    }
  }
}

// AFM_ISA's parser: no value picks the widest supported ISA, a name picks that one.
TEST(Dot, ChooseIsa) {
  const Isa widest = isas().back();
  EXPECT_EQ(afm::cpu::choose_isa(nullptr), widest);
  EXPECT_EQ(afm::cpu::choose_isa(""), widest);
  for (Isa isa : kIsas) {
    if (afm::cpu::isa_supported(isa)) {
      EXPECT_EQ(afm::cpu::choose_isa(afm::cpu::isa_name(isa)), isa);
    } else {
      EXPECT_THROW(afm::cpu::choose_isa(afm::cpu::isa_name(isa)), afm::Error);
    }
  }
  EXPECT_THROW(afm::cpu::choose_isa("avx9"), afm::Error);
}

TEST(Dot, RejectsBadRowCount) {
  const float w[4] = {}, x[4] = {};
  float out[8];
  for (Isa isa : isas()) {
    const auto dot = afm::cpu::dot_kernel(WeightFormat::F32, isa);
    EXPECT_THROW(dot(reinterpret_cast<const uint8_t*>(w), x, 4, 0, 4, out), afm::Error);
    EXPECT_THROW(dot(reinterpret_cast<const uint8_t*>(w), x, 4, 5, 4, out), afm::Error);
  }
}

// Special f16 values through both converters: +-0, subnormals, the smallest and largest normals.
TEST(Dot, F16SpecialValues) {
  const uint16_t halves[16] = {0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF,
                               0x3C00, 0xBC00, 0x3555, 0x0200, 0x83FF, 0x0000, 0x0000, 0x0000};
  for (Isa isa : isas()) {
    for (int i = 0; i < 16; i++) {
      std::vector<float> x(16, 0.0f);
      x[i] = 1.0f;
      float out;
      afm::cpu::dot_kernel(WeightFormat::F16, isa)(reinterpret_cast<const uint8_t*>(halves), x.data(), 16, 1, 16,
                                                     &out);
      EXPECT_EQ(out, half_value(halves[i])) << afm::cpu::isa_name(isa) << " half 0x" << std::hex << halves[i];
    }
  }
}

}  // namespace
