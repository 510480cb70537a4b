// The prefill matmul (gemm.h) against a double-precision product of the decoded weights, for
// every SIMD ISA the CPU has, every weight format, and shapes that leave partial panels, token
// tiles and column slices; and the decode kernels it packs from.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "backends/cpu/gemm.h"
#include "error.h"
#include "numeric.h"
#include "support/random_weights.h"

using afm::Weight;
using afm::WeightFormat;
using afm::cpu::Isa;

namespace {

using afm::test::Matrix;

class GemmIsa : public testing::TestWithParam<Isa> {};

TEST_P(GemmIsa, MatchesExactProductOnOddShapes) {
  const Isa isa = GetParam();
  if (!afm::cpu::gemm_supported(isa)) GTEST_SKIP() << "no gemm kernels for " << afm::cpu::isa_name(isa) << " here";
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  afm::cpu::ThreadPool pool(2);
  struct Shape {
    int64_t tokens, rows, cols;
  };
  // Partial panels (rows not a multiple of 16 or 32), token counts around the tile sizes (6, 12),
  // columns around the 256-column slices and the 16/32-column packing tiles, odd column counts.
  const Shape shapes[] = {{1, 1, 1},    {16, 7, 5},     {13, 33, 17},  {12, 32, 256}, {25, 48, 257},
                          {6, 100, 513}, {40, 130, 31}, {17, 17, 600}, {7, 64, 1}};
  for (WeightFormat f : afm::test::kAllWeightFormats) {
    for (bool bf16_inputs : {false, true}) {
      if (f == WeightFormat::F16 && bf16_inputs) continue;  // f16 weights are only ever kept as the file's
      for (const Shape& s : shapes) {
        const Matrix m = afm::test::make_matrix(
            f, s.rows, s.cols, bf16_inputs ? afm::MatmulInputs::BF16 : afm::MatmulInputs::F32, rng);
        std::vector<float> x(s.tokens * s.cols);
        for (float& v : x) v = bf16_inputs ? afm::round_to_bf16(normal(rng)) : normal(rng);
        std::vector<float> out(s.tokens * s.rows + 1, 77.0f);
        afm::cpu::gemm(m.weight, x.data(), s.tokens, out.data(), pool, isa);
        EXPECT_EQ(out.back(), 77.0f) << "wrote past the output";
        for (int64_t t = 0; t < s.tokens; t++)
          for (int64_t n = 0; n < s.rows; n++) {
            double ref = 0, abs_sum = 0;
            for (int64_t k = 0; k < s.cols; k++) {
              const double p = m.values[n * s.cols + k] * x[t * s.cols + k];
              ref += p;
              abs_sum += std::fabs(p);
            }
            // Exact products summed in f32: at most ~k ulps of sum |w x| (bf16 pairs included).
            const double tol = (s.cols + 2) * 0x1p-24 * abs_sum + 1e-30;
            ASSERT_NEAR(out[t * s.rows + n], ref, tol)
                << afm::format_name(f) << (bf16_inputs ? " bf16 inputs" : "") << " T=" << s.tokens
                << " N=" << s.rows << " K=" << s.cols << " at t=" << t << " n=" << n;
          }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Gemm, GemmIsa, testing::ValuesIn(afm::cpu::kAllIsas),
                         [](const testing::TestParamInfo<Isa>& info) { return afm::cpu::isa_name(info.param); });

TEST(Gemm, ScalarIsaHasNoKernels) {
  EXPECT_FALSE(afm::cpu::gemm_supported(Isa::Scalar));
  std::mt19937 rng(1);
  const Matrix m = afm::test::make_matrix(WeightFormat::F32, 2, 2, afm::MatmulInputs::F32, rng);
  afm::cpu::ThreadPool pool(1);
  std::vector<float> x(4), out(4);
  EXPECT_THROW(afm::cpu::gemm(m.weight, x.data(), 2, out.data(), pool, Isa::Scalar), afm::Error);
}

class DecodeIsa : public testing::TestWithParam<Isa> {};

TEST_P(DecodeIsa, DecodesExactlyFromAnyBlock) {
  const Isa isa = GetParam();
  if (!afm::cpu::isa_supported(isa)) GTEST_SKIP() << "CPU has no " << afm::cpu::isa_name(isa);
  std::mt19937 rng(9);
  for (WeightFormat f : afm::test::kAllWeightFormats) {
    for (int64_t k : {1, 15, 16, 17, 100, 513}) {
      const afm::test::Row row = afm::test::make_row(f, k, rng);
      for (int64_t begin = 0; begin < k; begin += 16)
        for (int64_t count : {int64_t(1), int64_t(16), k - begin}) {
          if (begin + count > k) continue;
          std::vector<float> out(count + 1, 77.0f);
          afm::cpu::decode_kernel(f, isa)(row.bytes.data(), k, begin, count, out.data());
          EXPECT_EQ(out[count], 77.0f) << "wrote past count";
          for (int64_t i = 0; i < count; i++)
            ASSERT_EQ(out[i], float(row.values[begin + i])) << afm::format_name(f) << " k=" << k << " at " << begin + i;
        }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Decode, DecodeIsa, testing::ValuesIn(afm::cpu::kAllIsas),
                         [](const testing::TestParamInfo<Isa>& info) { return afm::cpu::isa_name(info.param); });

}  // namespace
