// The CPU backend's element-wise ops (add, relu_squared, silu_mul) against their formulas, on a
// tensor large enough to be split over the pool, with an odd length for the vector loops' tails
// and the values where a vectorized loop could differ from the scalar rule: signed zeros,
// infinities and NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "backend.h"

namespace {

constexpr int64_t kRows = 7, kCols = 14287;  // 100,009 values: past the pool's 16 Ki chunks, and odd

std::vector<float> special_and_random(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> v(kRows * kCols);
  for (float& x : v) x = normal(rng);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float special[] = {0.0f, -0.0f, inf, -inf, nan, 1e-40f, -1e-40f, 88.0f, -88.0f, 1e19f};
  for (size_t i = 0; i < std::size(special); i++) v[i * 9973 % v.size()] = special[i];
  v.back() = nan;  // the tail of the last chunk
  return v;
}

afm::Tensor filled(afm::Backend& backend, const std::vector<float>& values) {
  afm::Tensor t = backend.tensor(kRows, kCols);
  std::copy(values.begin(), values.end(), t.data);
  return t;
}

TEST(ElementWise, ReluSquaredKeepsNaNAndSquaresThePositivePart) {
  std::mt19937 rng(3);
  const auto backend = afm::make_backend(afm::Device::cpu(), 2);
  const std::vector<float> x = special_and_random(rng);
  afm::Tensor t = filled(*backend, x);
  backend->relu_squared(t);
  for (size_t i = 0; i < x.size(); i++) {
    if (std::isnan(x[i])) {
      EXPECT_TRUE(std::isnan(t.data[i])) << "value " << i;
      continue;
    }
    const float want = x[i] > 0 ? x[i] * x[i] : 0.0f;
    ASSERT_EQ(t.data[i], want) << "value " << i << " = " << x[i];
    ASSERT_FALSE(std::signbit(t.data[i])) << "value " << i << " = " << x[i];
  }
}

TEST(ElementWise, AddIsExactAndSiluMulFollowsTheFormula) {
  std::mt19937 rng(4);
  const auto backend = afm::make_backend(afm::Device::cpu(), 2);
  const std::vector<float> x = special_and_random(rng), y = special_and_random(rng);
  afm::Tensor sum = filled(*backend, x), gate = filled(*backend, x);
  const afm::Tensor other = filled(*backend, y);
  backend->add(sum, other);
  backend->silu_mul(gate, other);
  for (size_t i = 0; i < x.size(); i++) {
    const float want_sum = x[i] + y[i];
    if (std::isnan(want_sum)) EXPECT_TRUE(std::isnan(sum.data[i])) << "value " << i;
    else ASSERT_EQ(sum.data[i], want_sum) << "value " << i;
    const double g = x[i], want = g / (1.0 + std::exp(-g)) * double(y[i]);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(gate.data[i])) << "value " << i << ": silu(" << x[i] << ") * " << y[i];
    } else if (std::isinf(want)) {
      EXPECT_EQ(gate.data[i], float(want)) << "value " << i;
    } else {
      ASSERT_NEAR(gate.data[i], want, 1e-6 * std::fabs(want) + 1e-37) << "value " << i << ": silu(" << x[i] << ") * " << y[i];
    }
  }
}

}  // namespace
