// Sliding-window perplexity: one window against HF's own logits, the HF guide's window and token
// accounting derived by hand, and the error messages.
#include "perplexity.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "error.h"
#include "eval.h"
#include "tokenizer.h"

namespace {

using ::testing::HasSubstr;

const std::string kRepo = AFM_SOURCE_DIR;
const std::string kModelDir = kRepo + "/models/afm-tiny-austen";

// -log softmax(row)[target], written out here so the test does not lean on the code under test.
double nll(const float* row, int64_t vocab, int32_t target) {
  double max = row[0];
  for (int64_t i = 1; i < vocab; i++) max = std::max(max, double(row[i]));
  double sum = 0;
  for (int64_t i = 0; i < vocab; i++) sum += std::exp(double(row[i]) - max);
  return max + std::log(sum) - double(row[target]);
}

class PerplexityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_ = afm::build_model(kModelDir, afm::Device::cpu(), 512).release();
    tokens_ = new std::vector<int32_t>(austen_tokens());
  }
  static void TearDownTestSuite() {
    delete model_;
    delete tokens_;
  }

  // About 600 tokens from the middle of the corpus, cut at line breaks so the UTF-8 stays whole.
  static std::vector<int32_t> austen_tokens() {
    std::ifstream in(kRepo + "/tests/fixtures/corpus/austen.txt", std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    const std::string corpus = buffer.str();
    const size_t begin = corpus.find('\n', 2'000'000) + 1, end = corpus.find('\n', begin + 2'500);
    return afm::Tokenizer::load(kModelDir + "/tokenizer.json").encode(corpus.substr(begin, end - begin), true);
  }

  static afm::PerplexityResult ppl(std::span<const int32_t> tokens, int64_t context, int64_t stride) {
    afm::PerplexityOptions options;
    options.context = context;
    options.stride = stride;
    return afm::perplexity(*model_, tokens, options);
  }

  // Mean NLL of tokens[begin + first .. end) when the model sees only tokens[begin, end).
  static double window_mean_nll(std::span<const int32_t> tokens, int64_t begin, int64_t end, int64_t first) {
    auto cache = model_->new_cache();
    std::vector<int32_t> positions;
    for (int64_t p = 0; p < end - begin; p++) positions.push_back(int32_t(p));
    const afm::Tensor logits = model_->forward(tokens.subspan(begin, end - begin), positions, *cache);
    double sum = 0;
    for (int64_t i = first; i < end - begin; i++) sum += nll(logits.row(i - 1), logits.cols, tokens[begin + i]);
    return sum / double(end - begin - first);
  }

  static afm::Model* model_;
  static std::vector<int32_t>* tokens_;
};

afm::Model* PerplexityTest::model_ = nullptr;
std::vector<int32_t>* PerplexityTest::tokens_ = nullptr;

TEST_F(PerplexityTest, OneWindowMatchesHfLogits) {
  const afm::Reference reference =
      afm::load_reference(kRepo + "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors");
  const afm::PromptReference& prompt = reference.prompts[0];
  const int64_t T = int64_t(prompt.ids.size()), vocab = reference.vocab_size;
  ASSERT_GT(T, 100);
  ASSERT_EQ(int64_t(prompt.logits.size()), T * vocab);

  double sum = 0;  // HF's logits row i-1 predicts token i
  for (int64_t i = 1; i < T; i++) sum += nll(&prompt.logits[(i - 1) * vocab], vocab, prompt.ids[i]);
  const double expected = std::exp(sum / double(T - 1));

  const afm::PerplexityResult result = ppl(prompt.ids, 512, 0);
  EXPECT_EQ(result.windows, 1);
  EXPECT_EQ(result.tokens_scored, T - 1);
  EXPECT_NEAR(result.perplexity, expected, 1e-4 * expected);
  EXPECT_NEAR(result.nll_per_token, std::log(expected), 1e-4);
  // The default context is the model's max_seq_len, which holds the whole prompt.
  EXPECT_DOUBLE_EQ(afm::perplexity(*model_, prompt.ids, {}).perplexity, result.perplexity);
}

// n = 10, ctx 4, stride 2 by the guide's loop:
//   begin 0: window [0,4),  trg_len 4, predicts tokens 1..3, weight 3
//   begin 2: window [2,6),  trg_len 2, predicts tokens 4,5,  weight 1
//   begin 4: window [4,8),  trg_len 2, predicts tokens 6,7,  weight 1
//   begin 6: window [6,10), trg_len 2, predicts tokens 8,9,  weight 1; end == n, stop
TEST_F(PerplexityTest, OverlappingWindowsFollowTheHfGuide) {
  const std::span<const int32_t> tokens(tokens_->data(), 10);
  const afm::PerplexityResult result = ppl(tokens, 4, 2);
  EXPECT_EQ(result.windows, 4);
  EXPECT_EQ(result.tokens_scored, 6);
  const double expected = (3 * window_mean_nll(tokens, 0, 4, 1) + window_mean_nll(tokens, 2, 6, 2) +
                           window_mean_nll(tokens, 4, 8, 2) + window_mean_nll(tokens, 6, 10, 2)) / 6;
  EXPECT_NEAR(result.nll_per_token, expected, 1e-5 * expected);
  EXPECT_NEAR(result.perplexity, std::exp(expected), 1e-5 * std::exp(expected));
}

// The last window predicts one token but weighs 0 (trg_len - 1): it counts, and adds nothing.
//   n = 7, ctx 4, stride 2: [0,4) weight 3, [2,6) weight 1, [4,7) trg_len 1 weight 0
TEST_F(PerplexityTest, LastWindowWithOneTargetWeighsNothing) {
  const std::span<const int32_t> tokens(tokens_->data(), 7);
  const afm::PerplexityResult result = ppl(tokens, 4, 2);
  EXPECT_EQ(result.windows, 3);
  EXPECT_EQ(result.tokens_scored, 4);
  const double expected = (3 * window_mean_nll(tokens, 0, 4, 1) + window_mean_nll(tokens, 2, 6, 2)) / 4;
  EXPECT_NEAR(result.nll_per_token, expected, 1e-5 * expected);
}

// stride == ctx: disjoint chunks [0,4) [4,8) [8,10), each scored on its own with no context
// from the one before, so the result is the chunks' one-window results weighted 3, 3, 1.
TEST_F(PerplexityTest, StrideEqualToContextGivesDisjointWindows) {
  const std::span<const int32_t> tokens(tokens_->data(), 10);
  const afm::PerplexityResult result = ppl(tokens, 4, 4);
  EXPECT_EQ(result.windows, 3);
  EXPECT_EQ(result.tokens_scored, 7);
  const double a = ppl(tokens.subspan(0, 4), 4, 4).nll_per_token, b = ppl(tokens.subspan(4, 4), 4, 4).nll_per_token,
               c = ppl(tokens.subspan(8, 2), 4, 4).nll_per_token;
  const double expected = (3 * a + 3 * b + c) / 7;
  EXPECT_NEAR(result.nll_per_token, expected, 1e-5 * expected);
  EXPECT_DOUBLE_EQ(ppl(tokens, 4, 0).perplexity, result.perplexity);  // stride 0 means stride = ctx

  // A last chunk of a single token has no prediction: a window, but no NaN and no weight.
  const afm::PerplexityResult odd = ppl(tokens.first(9), 4, 4);
  EXPECT_EQ(odd.windows, 3);
  EXPECT_EQ(odd.tokens_scored, 6);
  EXPECT_NEAR(odd.nll_per_token, (3 * a + 3 * b) / 6, 1e-5 * expected);
}

TEST_F(PerplexityTest, MoreContextScoresRealTextBetter) {
  const std::vector<int32_t>& tokens = *tokens_;
  ASSERT_GT(tokens.size(), 500u);
  const afm::PerplexityResult short_ctx = ppl(tokens, 16, 16);
  const afm::PerplexityResult sliding = ppl(tokens, 16, 8);
  // Not past 256: the model was trained on 256-token sequences and gets worse beyond them.
  const afm::PerplexityResult long_ctx = ppl(tokens, 256, 128);
  // Every token after the first is predicted exactly once; the guide weighs each overlapping
  // window by trg_len - 1, so n - 1 minus one per window after the first.
  EXPECT_EQ(short_ctx.tokens_scored, int64_t(tokens.size()) - short_ctx.windows);
  EXPECT_EQ(long_ctx.tokens_scored, int64_t(tokens.size()) - long_ctx.windows);
  EXPECT_LT(sliding.perplexity, short_ctx.perplexity);
  EXPECT_LT(long_ctx.perplexity, sliding.perplexity);
  EXPECT_GT(long_ctx.perplexity, 1.0);
  EXPECT_LT(long_ctx.perplexity, 100.0);  // a model trained on Austen, reading Austen
}

TEST_F(PerplexityTest, ReportsProgressInTokens) {
  std::vector<std::pair<int64_t, int64_t>> calls;
  afm::PerplexityOptions options;
  options.context = 4;
  options.stride = 2;
  options.on_progress = [&](int64_t done, int64_t total) { calls.emplace_back(done, total); };
  afm::perplexity(*model_, std::span(tokens_->data(), 10), options);
  const std::vector<std::pair<int64_t, int64_t>> expected = {{4, 10}, {6, 10}, {8, 10}, {10, 10}};
  EXPECT_EQ(calls, expected);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const afm::Error& e) {
    return e.what();
  }
  return "no afm::Error";
}

TEST_F(PerplexityTest, RejectsBadArgumentsNamingTheFlag) {
  const std::span<const int32_t> tokens(tokens_->data(), 10);
  EXPECT_THAT(error_of([&] { ppl(tokens, 1, 1); }), HasSubstr("--ctx must be at least 2"));
  EXPECT_THAT(error_of([&] { ppl(tokens, 513, 0); }), HasSubstr("--ctx 513 exceeds the model's max_seq_len of 512"));
  EXPECT_THAT(error_of([&] { ppl(tokens, 4, 5); }), HasSubstr("--stride must be between 1 and --ctx (4), got 5"));
  EXPECT_THAT(error_of([&] { ppl(tokens, 4, -1); }), HasSubstr("--stride"));
  EXPECT_THAT(error_of([&] { ppl(tokens.first(1), 4, 2); }), HasSubstr("--text gives 1 token(s)"));
  const std::vector<int32_t> bad = {(*tokens_)[0], 4104};
  EXPECT_THAT(error_of([&] { ppl(bad, 4, 2); }), HasSubstr("--text token 1 has id 4104, outside the model's vocabulary"));
}

}  // namespace
