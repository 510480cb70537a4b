// RoPE frequencies and scaling against transformers' own values (stored in each reference), and
// against the formulas worked by hand for the variants the fixtures do not cover.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "config.h"
#include "rope.h"
#include "safetensors.h"

namespace {

const std::string kFixtures = std::string(AFM_SOURCE_DIR) + "/tests/fixtures/";

struct RopeCase {
  std::string config, reference_dir;
};

class RopeReference : public ::testing::TestWithParam<RopeCase> {};

TEST_P(RopeReference, InvFreqAndScalingMatchTransformers) {
  afm::ModelConfig config = afm::load_config(GetParam().config);
  afm::RopeFrequencies freqs = afm::rope_frequencies(config.rope, config.head_dim);
  auto file = afm::SafetensorsFile::open(kFixtures + GetParam().reference_dir + "/reference.safetensors");
  std::vector<float> expected = file.get("rope.inv_freq").to_f32();
  ASSERT_EQ(freqs.inv_freq.size(), expected.size());
  for (size_t i = 0; i < expected.size(); i++)
    EXPECT_NEAR(freqs.inv_freq[i], expected[i], 2e-7 * expected[i]) << "inv_freq[" << i << "]";
  std::ifstream meta(kFixtures + GetParam().reference_dir + "/reference.json");
  double scaling = nlohmann::json::parse(meta)["rope_attention_scaling"].get<double>();
  EXPECT_NEAR(freqs.attention_scaling, scaling, 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RopeReference,
                         ::testing::Values(RopeCase{kFixtures + "tiny-arcee/config.json", "tiny-arcee"},
                                           RopeCase{kFixtures + "tiny-llama/config.json", "tiny-llama"},
                                           RopeCase{std::string(AFM_SOURCE_DIR) + "/models/afm-tiny-austen/config.json",
                                                    "afm-tiny-austen-reference"}));

TEST(Rope, AfmUsesTheConfiguredYarnFactor) {
  afm::ModelConfig config = afm::load_config(kFixtures + "afm-4.5b-config.json");
  EXPECT_EQ(config.rope.type, "yarn");
  EXPECT_EQ(config.rope.factor, 20.0);  // not max_position_embeddings / original = 16
  // 0.1 ln 20 + 1
  EXPECT_NEAR(afm::rope_frequencies(config.rope, config.head_dim).attention_scaling, 1.2995732, 1e-6);
}

TEST(Rope, DefaultFrequenciesAreThetaPowers) {
  afm::RopeConfig rope;  // default, theta 10000
  auto freqs = afm::rope_frequencies(rope, 8);
  const double expected[] = {1.0, 0.1, 0.01, 0.001};  // 10000^(-2i/8)
  for (int i = 0; i < 4; i++) EXPECT_NEAR(freqs.inv_freq[i], expected[i], 1e-7);
  EXPECT_EQ(freqs.attention_scaling, 1.0f);
}

TEST(Rope, YarnMscaleRatioAndExplicitAttentionFactor) {
  afm::RopeConfig rope;
  rope.type = "yarn";
  rope.factor = 40;
  rope.original_max_position_embeddings = 4096;
  rope.mscale = 0.707;
  rope.mscale_all_dim = 1.0;
  // (0.1 * 0.707 * ln 40 + 1) / (0.1 * ln 40 + 1) = 1.2608040 / 1.3688879
  EXPECT_NEAR(afm::rope_frequencies(rope, 64).attention_scaling, 0.9210425, 1e-6);
  rope.attention_factor = 0.5;
  EXPECT_EQ(afm::rope_frequencies(rope, 64).attention_scaling, 0.5f);
}

TEST(Rope, YarnKeepsHighFrequenciesAndInterpolatesLowOnes) {
  afm::RopeConfig rope;
  rope.type = "yarn";
  rope.factor = 20;
  rope.original_max_position_embeddings = 4096;
  rope.theta = 10000;
  const int64_t dim = 128;
  auto freqs = afm::rope_frequencies(rope, dim);
  // Correction dims: dim * ln(4096 / (2 pi beta)) / (2 ln 10000) = 20.94 for beta_fast 32 and
  // 45.03 for beta_slow 1, truncated to [20, 46]. Pairs up to 20 keep the original frequency,
  // pairs from 46 on are divided by the factor, and pair 33 sits halfway along the ramp.
  auto original = [&](int i) { return std::pow(10000.0, -2.0 * i / dim); };
  for (int i = 0; i <= 20; i++) EXPECT_NEAR(freqs.inv_freq[i], original(i), 1e-6 * original(i)) << i;
  for (int i = 46; i < 64; i++) EXPECT_NEAR(freqs.inv_freq[i], original(i) / 20, 1e-6 * original(i)) << i;
  EXPECT_NEAR(freqs.inv_freq[33], 0.5 * original(33) + 0.5 * original(33) / 20, 1e-6 * original(33));
}

TEST(Rope, TablesRotateByPositionTimesFrequency) {
  afm::RopeFrequencies freqs{{1.0f, 0.5f}, 2.0f};
  afm::RopeTables t = afm::rope_tables(freqs, 4);
  EXPECT_NEAR(t.cos_at(3)[0], 2 * std::cos(3.0), 1e-6);
  EXPECT_NEAR(t.sin_at(3)[1], 2 * std::sin(1.5), 1e-6);
  EXPECT_NEAR(t.cos_at(0)[1], 2.0, 1e-7);
}

}  // namespace
