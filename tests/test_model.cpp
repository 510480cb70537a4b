// The engine against HF transformers: logits, greedy tokens and hidden states of the fixtures.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "error.h"
#include "eval.h"
#include "model.h"

namespace {

const std::string kRepo = AFM_SOURCE_DIR;

struct Fixture {
  std::string model, reference;
};

const Fixture kFixtures[] = {
    {kRepo + "/tests/fixtures/tiny-arcee", kRepo + "/tests/fixtures/tiny-arcee/reference.safetensors"},
    {kRepo + "/tests/fixtures/tiny-llama", kRepo + "/tests/fixtures/tiny-llama/reference.safetensors"},
    {kRepo + "/models/afm-tiny-austen", kRepo + "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors"},
};

class ModelReference : public ::testing::TestWithParam<Fixture> {};

TEST_P(ModelReference, F32MatchesTransformers) {
  auto model = afm::build_model(GetParam().model, afm::Device::cpu(), 512);
  afm::Reference reference = afm::load_reference(GetParam().reference);
  afm::EvalResult result = afm::teacher_forcing_eval(*model, reference, /*compare_layers=*/true);
  ASSERT_EQ(result.prompts.size(), reference.prompts.size());
  for (size_t i = 0; i < result.prompts.size(); i++) {
    const afm::PromptResult& r = result.prompts[i];
    SCOPED_TRACE("prompt " + std::to_string(i));
    EXPECT_EQ(r.steps, int64_t(reference.prompts[i].generated.size()));
    EXPECT_GE(r.prefill_max_rel_err, 0.0);
    EXPECT_LE(r.prefill_max_rel_err, 1e-4);
    EXPECT_LE(r.decode_max_rel_err, 1e-4);
    EXPECT_EQ(r.top1, 1.0);
    EXPECT_EQ(r.top5, 1.0);
  }
  // Prompt 0 carries the hidden state entering every layer, plus the final norm's output.
  const afm::PromptResult& first = result.prompts[0];
  ASSERT_EQ(int64_t(first.layer_max_rel_err.size()), model->config().num_layers + 1);
  for (size_t layer = 0; layer < first.layer_max_rel_err.size(); layer++)
    EXPECT_LE(first.layer_max_rel_err[layer], 1e-4) << "hidden." << layer;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelReference, ::testing::ValuesIn(kFixtures), [](const auto& info) {
  return std::string(std::array{"tiny_arcee", "tiny_llama", "afm_tiny_austen"}[info.index]);
});

std::vector<int32_t> iota_positions(int64_t start, int64_t n) {
  std::vector<int32_t> p(n);
  std::iota(p.begin(), p.end(), int32_t(start));
  return p;
}

TEST(Model, ChunkedPrefillEqualsOnePass) {
  auto model = afm::build_model(kFixtures[0].model, afm::Device::cpu(), 256);
  afm::Reference reference = afm::load_reference(kFixtures[0].reference);
  const std::vector<int32_t>& ids = reference.prompts[1].ids;
  const int64_t T = int64_t(ids.size()), split = T / 3, vocab = model->config().vocab_size;

  auto one_pass = model->new_cache();
  afm::Tensor full = model->forward(ids, iota_positions(0, T), *one_pass, afm::Logits::Last);

  auto chunked = model->new_cache();
  std::span<const int32_t> all(ids);
  model->forward(all.first(split), iota_positions(0, split), *chunked);
  afm::Tensor tail = model->forward(all.subspan(split), iota_positions(split, T - split), *chunked, afm::Logits::Last);
  ASSERT_EQ(full.rows, 1);
  ASSERT_EQ(tail.rows, 1);
  EXPECT_LE(afm::max_row_relative_error(tail.data, full.data, 1, vocab), 1e-5);
  EXPECT_LE(afm::max_row_relative_error(full.data, &reference.prompts[1].logits[(T - 1) * vocab], 1, vocab), 1e-4);
  EXPECT_EQ(chunked->length(), T);
}

TEST(Model, RejectsPositionsThatDoNotContinueTheCache) {
  auto model = afm::build_model(kFixtures[0].model, afm::Device::cpu(), 64);
  auto cache = model->new_cache();
  std::vector<int32_t> tokens = {4096, 10, 11};
  model->forward(tokens, iota_positions(0, 3), *cache);
  std::vector<int32_t> token = {12}, wrong = {7};
  try {
    model->forward(token, wrong, *cache);
    FAIL() << "expected afm::Error";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("continue the cache"), std::string::npos) << e.what();
  }
}

TEST(Model, PromptLongerThanTheContextIsAClearError) {
  auto model = afm::build_model(kFixtures[0].model, afm::Device::cpu(), 32);
  auto cache = model->new_cache();
  std::vector<int32_t> tokens(40, 100);
  try {
    model->forward(tokens, iota_positions(0, 40), *cache);
    FAIL() << "expected afm::Error";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the context limit of 32"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cache->length(), 0);
}

TEST(Model, TokenOutsideTheVocabularyIsAClearError) {
  auto model = afm::build_model(kFixtures[1].model, afm::Device::cpu(), 32);
  auto cache = model->new_cache();
  std::vector<int32_t> tokens = {4096, 5000};
  try {
    model->forward(tokens, iota_positions(0, 2), *cache);
    FAIL() << "expected afm::Error";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 5000"), std::string::npos) << e.what();
  }
}

TEST(Eval, NonFiniteOutputIsTheWorstErrorNotZero) {
  const float ref[3] = {1, 2, 3}, nan_row[3] = {1, NAN, 3}, inf_row[3] = {INFINITY, 2, 3};
  EXPECT_EQ(afm::max_row_relative_error(ref, ref, 1, 3), 0.0);
  EXPECT_TRUE(std::isinf(afm::max_row_relative_error(nan_row, ref, 1, 3)));
  EXPECT_TRUE(std::isinf(afm::max_row_relative_error(inf_row, ref, 1, 3)));
}

TEST(Model, TheMemoryBudgetCountsWeightsInTheirFormatAndTheKVCache) {
  // afm-tiny-austen: 6.2M bf16 parameters, which f32 compute maps as they are (12.5 MB) and bfp8
  // stores in 6.6 MB; its KV cache for 256 positions is far smaller.
  afm::ModelOptions options;
  options.max_seq_len = 256;
  options.max_memory = 10'000'000;
  options.weights = afm::WeightFormat::F32;
  try {
    afm::build_model(kFixtures[2].model, options);
    ADD_FAILURE() << "f32 weights fit a 10 MB budget";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("(weights 12.5 MB as f32"), std::string::npos) << e.what();
  }
  options.weights = afm::WeightFormat::BFP8;
  EXPECT_EQ(afm::build_model(kFixtures[2].model, options)->max_seq_len(), 256);
}

TEST(Model, DefaultMaxSeqLenIsTheConfigLimitWhenMemoryAllows) {
  auto model = afm::build_model(kFixtures[1].model);  // tiny-llama: max_position_embeddings 8192
  EXPECT_EQ(model->max_seq_len(), 8192);
}

}  // namespace
