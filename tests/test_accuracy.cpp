// The bring-up note's accuracy bar for each weight format, on the trained model (random-weight
// fixtures have flat logits, so there the reduced formats are recorded in docs/ACCURACY.md, not gated).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "error.h"
#include "eval.h"
#include "perplexity.h"
#include "tokenizer.h"

namespace {

const std::string kModel = std::string(AFM_SOURCE_DIR) + "/models/afm-tiny-austen";
const std::string kReference = std::string(AFM_SOURCE_DIR) + "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors";

afm::EvalResult evaluate(afm::WeightFormat format, const afm::Reference& reference) {
  afm::ModelOptions options;
  options.weights = format;
  options.max_seq_len = 256;
  auto model = afm::build_model(kModel, options);
  EXPECT_EQ(model->weight_format(), format);
  return afm::teacher_forcing_eval(*model, reference, false);
}

TEST(Accuracy, F32IsExact) {
  auto r = evaluate(afm::WeightFormat::F32, afm::load_reference(kReference));
  EXPECT_EQ(r.top1, 1.0);
  EXPECT_EQ(r.top5, 1.0);
  EXPECT_LE(r.prefill_max_rel_err, 1e-4);
  EXPECT_LE(r.decode_max_rel_err, 1e-4);
}

TEST(Accuracy, Bf16MeetsItsBar) {
  auto r = evaluate(afm::WeightFormat::BF16, afm::load_reference(kReference));
  EXPECT_GE(r.top1, 0.99);
  EXPECT_EQ(r.top5, 1.0);
  EXPECT_LE(r.prefill_max_rel_err, 2e-2);
  EXPECT_LE(r.decode_max_rel_err, 2e-2);
  EXPECT_GT(r.prefill_max_rel_err, 1e-4);  // bf16 activations really are in use
}

TEST(Accuracy, Bfp8MeetsTheNotesBar) {
  auto r = evaluate(afm::WeightFormat::BFP8, afm::load_reference(kReference));
  EXPECT_GE(r.top1, 0.98);
  EXPECT_EQ(r.top5, 1.0);
  EXPECT_LE(r.prefill_max_rel_err, 5e-2);
}

TEST(Accuracy, Bfp4KeepsTop5) {
  auto r = evaluate(afm::WeightFormat::BFP4, afm::load_reference(kReference));
  EXPECT_GE(r.top5, 0.95);
}

// Perplexity over the end of Sense and Sensibility, the corpus's last text.
double austen_perplexity(afm::WeightFormat format) {
  std::ifstream in(std::string(AFM_SOURCE_DIR) + "/tests/fixtures/corpus/austen.txt");
  const std::string corpus((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const afm::Tokenizer tokenizer = afm::Tokenizer::load(kModel + "/tokenizer.json");
  const std::vector<int32_t> tokens = tokenizer.encode(corpus.substr(corpus.size() - 8000), true);
  afm::ModelOptions options;
  options.weights = format;
  options.max_seq_len = 256;
  auto model = afm::build_model(kModel, options);
  afm::PerplexityOptions window;
  window.context = 256;
  window.stride = 128;
  return afm::perplexity(*model, tokens, window).perplexity;
}

TEST(Accuracy, Bfp8PerplexityIsWithinOnePercentOfF32) {
  const double f32 = austen_perplexity(afm::WeightFormat::F32);
  const double bfp8 = austen_perplexity(afm::WeightFormat::BFP8);
  EXPECT_GT(f32, 5.0);  // a trained model on its own domain, not a degenerate score
  EXPECT_LT(f32, 60.0);
  EXPECT_LE(std::abs(bfp8 - f32) / f32, 0.01) << "f32 " << f32 << " bfp8 " << bfp8;
}

// The note's own procedure: a prompt file tokenized by afm, HF's 100 tokens after it.
TEST(Accuracy, NoteStyleEvalOnThePromptFile) {
  afm::Tokenizer tokenizer = afm::Tokenizer::load(kModel + "/tokenizer.json");
  std::ifstream in(kModel + "/eval_prompt.txt");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  afm::Reference reference = afm::prompt_reference(tokenizer.encode(text, true), kReference, 100);
  ASSERT_EQ(reference.prompts.size(), 1u);
  EXPECT_EQ(reference.prompts[0].ids.size(), 119u);
  EXPECT_EQ(reference.prompts[0].generated.size(), 100u);
  auto r = evaluate(afm::WeightFormat::BFP8, reference);
  EXPECT_GE(r.top1, 0.98);
  EXPECT_EQ(r.top5, 1.0);
}

TEST(Accuracy, PromptReferenceChecksItsInputs) {
  using ::testing::HasSubstr;
  try {
    afm::prompt_reference({4096, 1, 2}, kReference, 10);
    FAIL();
  } catch (const afm::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("made from another prompt or tokenizer"));
  }
  const std::string ids = ::testing::TempDir() + "/afm_reference_tokens.json";
  std::ofstream(ids) << "[5, 6, 7]";
  afm::Reference r = afm::prompt_reference({4096, 1}, ids, 2);
  EXPECT_EQ(r.prompts[0].generated, (std::vector<int32_t>{5, 6}));
  try {
    afm::prompt_reference({4096, 1}, ids, 4);
    FAIL();
  } catch (const afm::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("holds 3 reference tokens, fewer than --max-new-tokens 4"));
  }
}

}  // namespace
