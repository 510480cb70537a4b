// Sampler and generation_config.json. Expected sets and probabilities are worked out by hand from
// HF's rules (noted next to each case); logits are often ln(p) so the softmax is p itself.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "error.h"
#include "sampler.h"

using namespace afm;

namespace {

std::vector<float> log_probs(std::vector<double> p) {
  std::vector<float> out;
  for (double x : p) out.push_back(static_cast<float>(std::log(x)));
  return out;
}

SamplingParams sampling(float temperature = 1.0f, int top_k = 0, float top_p = 1.0f, float min_p = 0.0f) {
  SamplingParams p;
  p.do_sample = true;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  return p;
}

std::vector<int32_t> kept_ids(const SamplingParams& p, const std::vector<float>& logits,
                              const std::vector<int32_t>& context = {}) {
  Sampler s(p);
  std::vector<int32_t> ids;
  for (const Candidate& c : s.candidates(logits, context)) ids.push_back(c.id);
  return ids;
}

// Checks ids and probabilities of the kept set against hand-computed values.
void expect_dist(const SamplingParams& p, const std::vector<float>& logits,
                 const std::vector<std::pair<int32_t, double>>& expected,
                 const std::vector<int32_t>& context = {}) {
  Sampler s(p);
  std::span<const Candidate> got = s.candidates(logits, context);
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < got.size(); i++) {
    EXPECT_EQ(got[i].id, expected[i].first) << "position " << i;
    EXPECT_NEAR(got[i].prob, expected[i].second, 2e-6) << "token " << got[i].id;
  }
}

std::string write_temp(const std::string& name, const std::string& text) {
  std::string path = testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

using Ids = std::vector<int32_t>;

}  // namespace

// ---------------------------------------------------------------- top-k

TEST(TopK, KeepsTheKLargest) {
  // Scores 5, 4, 3 survive (ids 1, 3, 2); softmax of (5, 3, 4) for ids (1, 2, 3).
  expect_dist(sampling(1.0f, 3), {1.0f, 5.0f, 3.0f, 4.0f, 2.0f},
              {{1, 0.66524096}, {2, 0.09003057}, {3, 0.24472847}});
}

TEST(TopK, TiesWithTheKthScoreSurvive) {
  // HF removes scores strictly below the k-th largest. k=2: the two 2.0s. k=3: the k-th score is 1.0,
  // shared by ids 1 and 3, so both stay and four tokens survive.
  std::vector<float> logits = {2.0f, 1.0f, 2.0f, 1.0f, 0.0f};
  EXPECT_EQ(kept_ids(sampling(1.0f, 2), logits), (Ids{0, 2}));
  EXPECT_EQ(kept_ids(sampling(1.0f, 3), logits), (Ids{0, 1, 2, 3}));
}

TEST(TopK, KAtLeastVocabularyKeepsEverything) {
  std::vector<float> logits = {0.5f, -1.0f, 2.0f};
  EXPECT_EQ(kept_ids(sampling(1.0f, 3), logits), (Ids{0, 1, 2}));
  EXPECT_EQ(kept_ids(sampling(1.0f, 50), logits), (Ids{0, 1, 2}));
}

// ---------------------------------------------------------------- top-p

TEST(TopP, KeepsTheSmallestPrefixReachingTopP) {
  // p = (0.1, 0.4, 0.2, 0.3). Ranked: id1 .4, id3 .3, id2 .2, id0 .1; mass ranked above each:
  // 0, .4, .7, .9. A token stays while that mass is < top_p.
  std::vector<float> logits = log_probs({0.1, 0.4, 0.2, 0.3});
  expect_dist(sampling(1.0f, 0, 0.6f), logits, {{1, 0.4 / 0.7}, {3, 0.3 / 0.7}});
  expect_dist(sampling(1.0f, 0, 0.75f), logits, {{1, 0.4 / 0.9}, {2, 0.2 / 0.9}, {3, 0.3 / 0.9}});
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 0.95f), logits), (Ids{0, 1, 2, 3}));
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 0.3f), logits), (Ids{1}));
}

TEST(TopP, AlwaysKeepsTheMostProbableToken) {
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 0.01f), log_probs({0.1, 0.4, 0.2, 0.3})), (Ids{1}));
}

TEST(TopP, CumulativeExactlyTopPStopsThere) {
  // Four equal logits: p = 0.25 exactly. With top_p = 0.5, two tokens reach exactly 0.5; HF's
  // "cumulative <= 1 - top_p" removes the other two (0.25 <= 0.5, 0.5 <= 0.5). Equal probabilities
  // rank the lower id first.
  std::vector<float> uniform4 = {0.0f, 0.0f, 0.0f, 0.0f};
  expect_dist(sampling(1.0f, 0, 0.5f), uniform4, {{0, 0.5}, {1, 0.5}});
  expect_dist(sampling(1.0f, 0, 0.75f), uniform4, {{0, 1 / 3.0}, {1, 1 / 3.0}, {2, 1 / 3.0}});
  // Just past the boundary one more token is needed.
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 0.5001f), uniform4), (Ids{0, 1, 2}));
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 0.25f), uniform4), (Ids{0}));
}

TEST(TopP, TiesAcrossTheCutAreBrokenByLowestId) {
  // p = (.2, .2, .4, .2): id2 first (mass above 0), then the tied .2s in id order with mass above
  // .4, .6, .8. top_p = 0.7 keeps ids 2, 0, 1 and drops id 3.
  expect_dist(sampling(1.0f, 0, 0.7f), log_probs({0.2, 0.2, 0.4, 0.2}),
              {{0, 0.25}, {1, 0.25}, {2, 0.5}});
}

TEST(TopP, LargeVocabularyWithoutTopK) {
  // 131072 tokens at logit 0 and two at 20: each of the two has e^20 / (2 e^20 + 131070) = 0.49993,
  // so top_p = 0.9 needs both, and the 131070 tail tokens (1e-9 each) are dropped.
  std::vector<float> logits(131072, 0.0f);
  logits[7] = 20.0f;
  logits[100000] = 20.0f;
  expect_dist(sampling(1.0f, 0, 0.9f), logits, {{7, 0.5}, {100000, 0.5}});
}

// ---------------------------------------------------------------- min-p

TEST(MinP, KeepsTokensAtLeastMinPTimesTheTop) {
  // p = (0.1, 0.4, 0.2, 0.3), top 0.4. min_p 0.6 => floor 0.24: ids 1, 3. min_p 0.3 => 0.12: ids 1, 2, 3.
  std::vector<float> logits = log_probs({0.1, 0.4, 0.2, 0.3});
  expect_dist(sampling(1.0f, 0, 1.0f, 0.6f), logits, {{1, 0.4 / 0.7}, {3, 0.3 / 0.7}});
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 1.0f, 0.3f), logits), (Ids{1, 2, 3}));
}

TEST(MinP, OneKeepsEveryTokenTiedWithTheTop) {
  // The floor equals the top probability; "prob < floor" removes only strictly smaller ones.
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 1.0f, 1.0f), {0.0f, 0.0f, -1.0f}), (Ids{0, 1}));
}

// ---------------------------------------------------------------- order of the chain

TEST(Chain, TopKBeforeTopP) {
  // p = (.05, .35, .10, .25, .15, .10). Top-3 keeps ids 1, 3, 4 -> (.35, .25, .15)/.75 =
  // (.4667, .3333, .2). Top-p 0.7 on that: mass above id4 is .8 => dropped. Result {1, 3}.
  // (Top-p first on the full distribution would have kept id 4: mass above it .6 < .7.)
  std::vector<float> logits = log_probs({0.05, 0.35, 0.10, 0.25, 0.15, 0.10});
  expect_dist(sampling(1.0f, 3, 0.7f), logits, {{1, 0.35 / 0.6}, {3, 0.25 / 0.6}});
  // Then min-p 0.75: floor .75 * .5833 = .4375 removes id 3 (.4167).
  EXPECT_EQ(kept_ids(sampling(1.0f, 3, 0.7f, 0.75f), logits), (Ids{1}));
}

TEST(Chain, TemperatureBeforeTopP) {
  // p = (.5, .3, .2). T = 1: mass above id1 is .5 < .6, so ids 0, 1 stay.
  // T = 0.5 squares and renormalises: (.25, .09, .04)/.38 = (.6579, .2368, .1053); mass above id1 is
  // .6579 >= .6, so only id 0 stays.
  std::vector<float> logits = log_probs({0.5, 0.3, 0.2});
  EXPECT_EQ(kept_ids(sampling(1.0f, 0, 0.6f), logits), (Ids{0, 1}));
  EXPECT_EQ(kept_ids(sampling(0.5f, 0, 0.6f), logits), (Ids{0}));
}

TEST(Chain, RepetitionPenaltyBeforeTopK) {
  // Scores (3, 2.5, 1), id 0 in the context. Penalty 4 makes id 0 score 0.75, below id 2, so top-2
  // keeps ids 1 and 2. Without the penalty top-2 keeps ids 0 and 1.
  SamplingParams p = sampling(1.0f, 2);
  p.repetition_penalty = 4.0f;
  EXPECT_EQ(kept_ids(p, {3.0f, 2.5f, 1.0f}, {0}), (Ids{1, 2}));
  p.repetition_penalty = 1.0f;
  EXPECT_EQ(kept_ids(p, {3.0f, 2.5f, 1.0f}, {0}), (Ids{0, 1}));
}

// ---------------------------------------------------------------- repetition penalty

TEST(RepetitionPenalty, DividesPositiveAndMultipliesNegativeLogits) {
  // Logits (2, -1, 0.5, 3), penalty 2 on ids 0 and 1 -> (1, -2, 0.5, 3); softmax by hand.
  SamplingParams p = sampling();
  p.repetition_penalty = 2.0f;
  expect_dist(p, {2.0f, -1.0f, 0.5f, 3.0f},
              {{0, 0.11055375}, {1, 0.00550415}, {2, 0.06705424}, {3, 0.81688786}}, {0, 1});
}

TEST(RepetitionPenalty, FlipsGreedyChoice) {
  SamplingParams p;  // greedy
  p.repetition_penalty = 2.0f;
  Sampler s(p);
  std::vector<int32_t> ctx = {0};
  EXPECT_EQ(s.sample(std::vector<float>{2.0f, 1.5f}, ctx), 1);    // 2 / 2 = 1 < 1.5
  EXPECT_EQ(s.sample(std::vector<float>{-1.0f, -1.5f}, ctx), 1);  // -1 * 2 = -2 < -1.5
  EXPECT_EQ(s.sample(std::vector<float>{2.0f, 1.5f}, {}), 0);     // no context, no penalty
  p.repetition_penalty = 0.5f;                                    // < 1 encourages repeats
  EXPECT_EQ(Sampler(p).sample(std::vector<float>{1.0f, 1.5f}, ctx), 0);  // 1 / 0.5 = 2
}

TEST(RepetitionPenalty, RepeatedContextTokenPenalisedOnce) {
  // id 0 appears three times; HF penalises it once: 4 / 2 = 2, softmax(2, 3).
  SamplingParams p = sampling();
  p.repetition_penalty = 2.0f;
  expect_dist(p, {4.0f, 3.0f}, {{0, 0.26894142}, {1, 0.73105858}}, {0, 0, 0});
}

// ---------------------------------------------------------------- temperature

TEST(Temperature, ScalesLogitsBeforeSoftmax) {
  std::vector<float> logits = {0.0f, 1.0f};
  expect_dist(sampling(0.5f), logits, {{0, 0.11920292}, {1, 0.88079708}});  // softmax(0, 2)
  expect_dist(sampling(2.0f), logits, {{0, 0.37754067}, {1, 0.62245933}});  // softmax(0, 0.5)
  expect_dist(sampling(1.0f), logits, {{0, 0.26894142}, {1, 0.73105858}});  // softmax(0, 1)
}

// ---------------------------------------------------------------- greedy

TEST(Greedy, ArgmaxWithTiesToLowestId) {
  Sampler s(SamplingParams{});
  EXPECT_EQ(s.sample(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}, {}), 1);
  EXPECT_EQ(s.sample(std::vector<float>{-5.0f, -7.0f, -5.0f}, {}), 0);
  std::span<const Candidate> c = s.candidates(std::vector<float>{0.0f, 0.0f, 9.0f}, {});
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].id, 2);
  EXPECT_EQ(c[0].prob, 1.0f);
}

TEST(Greedy, ZeroTemperatureIsGreedyEvenWhenSampling) {
  Sampler s(sampling(0.0f));
  for (int i = 0; i < 20; i++) EXPECT_EQ(s.sample(std::vector<float>{1.0f, 2.9f, 3.0f, 2.95f}, {}), 2);
}

// ---------------------------------------------------------------- random draws

namespace {
std::vector<int32_t> draw(uint64_t seed, int count) {
  SamplingParams p = sampling();
  p.seed = seed;
  Sampler s(p);
  std::vector<float> logits = {0.1f, 0.3f, -0.2f, 0.0f, 0.25f, 0.05f, -0.1f, 0.2f};  // near-uniform
  std::vector<int32_t> out;
  for (int i = 0; i < count; i++) out.push_back(s.sample(logits, {}));
  return out;
}
}  // namespace

TEST(Draw, SameSeedSameTokens) {
  EXPECT_EQ(draw(42, 200), draw(42, 200));
}

TEST(Draw, DifferentSeedsDiffer) {
  // 200 draws from 8 near-uniform tokens: two seeds agreeing everywhere has odds ~ (1/8)^200.
  EXPECT_NE(draw(42, 200), draw(43, 200));
}

TEST(Draw, FrequenciesMatchSoftmax) {
  // p = (.5, .25, .15, .1). Chi-square with 3 degrees of freedom; 16.27 is the 0.1% critical value.
  // The seed is fixed, so this is deterministic; it guards against a biased or shifted draw.
  const std::vector<double> p = {0.5, 0.25, 0.15, 0.1};
  SamplingParams params = sampling();
  params.seed = 1234;
  Sampler s(params);
  std::vector<float> logits = log_probs(p);
  const int n = 200000;
  std::vector<int> counts(p.size());
  for (int i = 0; i < n; i++) counts.at(s.sample(logits, {}))++;
  double chi2 = 0;
  for (size_t i = 0; i < p.size(); i++) chi2 += std::pow(counts[i] - n * p[i], 2) / (n * p[i]);
  EXPECT_LT(chi2, 16.27) << counts[0] << " " << counts[1] << " " << counts[2] << " " << counts[3];
}

TEST(Draw, NeverLeavesTheKeptSet) {
  // top-k 2 over p = (.1, .4, .2, .3): only ids 1 and 3 may appear, in ratio 4:3 (p = 4/7 for id 1).
  SamplingParams params = sampling(1.0f, 2);
  params.seed = 7;
  Sampler s(params);
  std::vector<float> logits = log_probs({0.1, 0.4, 0.2, 0.3});
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; i++) {
    int32_t t = s.sample(logits, {});
    ASSERT_TRUE(t == 1 || t == 3) << t;
    ones += t == 1;
  }
  // Binomial sd = sqrt(n p (1-p)) = 70; allow 5 sd.
  EXPECT_NEAR(ones, n * 4.0 / 7.0, 350);
}

// ---------------------------------------------------------------- invalid input

TEST(Params, InvalidValuesThrow) {
  auto bad = [](auto edit) {
    SamplingParams p = sampling();
    edit(p);
    EXPECT_THROW(Sampler{p}, Error);
  };
  bad([](SamplingParams& p) { p.temperature = -0.1f; });
  bad([](SamplingParams& p) { p.temperature = std::numeric_limits<float>::quiet_NaN(); });
  bad([](SamplingParams& p) { p.top_p = 0.0f; });
  bad([](SamplingParams& p) { p.top_p = 1.5f; });
  bad([](SamplingParams& p) { p.min_p = -0.1f; });
  bad([](SamplingParams& p) { p.min_p = 1.1f; });
  bad([](SamplingParams& p) { p.repetition_penalty = 0.0f; });
  bad([](SamplingParams& p) { p.top_k = -1; });
  try {
    SamplingParams p;
    p.top_p = 2.0f;
    Sampler{p};
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("top_p must be in (0, 1]"), std::string::npos) << e.what();
  }
}

TEST(Params, BadInputsThrow) {
  Sampler s(sampling());
  EXPECT_THROW(s.sample(std::vector<float>{}, {}), Error);
  std::vector<int32_t> out_of_range = {3};
  EXPECT_THROW(s.sample(std::vector<float>{0.0f, 1.0f, 2.0f}, out_of_range), Error);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_THROW(s.sample(std::vector<float>{-inf, -inf}, {}), Error);
}

// ---------------------------------------------------------------- generation_config.json

TEST(GenerationConfigFile, TinyAusten) {
  GenerationConfig c =
      load_generation_config(std::string(AFM_SOURCE_DIR) + "/models/afm-tiny-austen/generation_config.json");
  EXPECT_TRUE(c.sampling.do_sample);
  EXPECT_FLOAT_EQ(c.sampling.temperature, 0.8f);
  EXPECT_EQ(c.sampling.top_k, 50);
  EXPECT_FLOAT_EQ(c.sampling.top_p, 0.95f);
  EXPECT_FLOAT_EQ(c.sampling.repetition_penalty, 1.0f);
  EXPECT_FLOAT_EQ(c.sampling.min_p, 0.0f);
  EXPECT_EQ(c.max_new_tokens, 128);
  EXPECT_EQ(c.new_token_limit(1000), 128);
  EXPECT_EQ(c.eos_token_ids, (Ids{4097}));
  EXPECT_EQ(c.bos_token_id, 4096);
  EXPECT_EQ(c.pad_token_id, 4100);
}

TEST(GenerationConfigFile, EosAsList) {
  GenerationConfig c = parse_generation_config(R"({"eos_token_id": [128001, 128008, 128009]})", "t");
  EXPECT_EQ(c.eos_token_ids, (Ids{128001, 128008, 128009}));
}

TEST(GenerationConfigFile, MissingKeysTakeHfDefaults) {
  GenerationConfig c = parse_generation_config("{}", "t");
  EXPECT_FALSE(c.sampling.do_sample);
  EXPECT_EQ(c.sampling.temperature, 1.0f);
  EXPECT_EQ(c.sampling.top_k, 50);
  EXPECT_EQ(c.sampling.top_p, 1.0f);
  EXPECT_EQ(c.sampling.min_p, 0.0f);
  EXPECT_EQ(c.sampling.repetition_penalty, 1.0f);
  EXPECT_FALSE(c.max_new_tokens.has_value());
  EXPECT_EQ(c.max_length, 20);
  EXPECT_EQ(c.new_token_limit(5), 15);  // max_length bounds prompt + generated
  EXPECT_EQ(c.new_token_limit(25), 0);
  EXPECT_TRUE(c.eos_token_ids.empty());
  EXPECT_FALSE(c.bos_token_id.has_value());
  EXPECT_FALSE(c.pad_token_id.has_value());
}

TEST(GenerationConfigFile, NullDisablesLikeNone) {
  GenerationConfig c =
      parse_generation_config(R"({"top_k": null, "top_p": null, "eos_token_id": null, "max_length": 64})", "t");
  EXPECT_EQ(c.sampling.top_k, 0);
  EXPECT_EQ(c.sampling.top_p, 1.0f);
  EXPECT_TRUE(c.eos_token_ids.empty());
  EXPECT_EQ(c.new_token_limit(10), 54);
}

TEST(GenerationConfigFile, MissingFileUsesDefaultsAndModelIds) {
  GenerationConfig c = load_generation_config(testing::TempDir() + "no-such-dir/generation_config.json",
                                              {.eos_token_ids = {2, 7}, .bos_token_id = 1});
  EXPECT_EQ(c.eos_token_ids, (Ids{2, 7}));
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_FALSE(c.pad_token_id.has_value());
  EXPECT_EQ(c.sampling.top_k, 50);
  EXPECT_FALSE(c.sampling.do_sample);
}

TEST(GenerationConfigFile, FileThatExistsIgnoresModelIds) {
  // HF uses generation_config.json as written when it exists; config.json's ids do not fill gaps.
  std::string path = write_temp("afm_gen_no_eos.json", R"({"do_sample": true})");
  GenerationConfig c = load_generation_config(path, {.eos_token_ids = {2}});
  EXPECT_TRUE(c.sampling.do_sample);
  EXPECT_TRUE(c.eos_token_ids.empty());
}

TEST(GenerationConfigFile, MalformedJsonNamesTheFile) {
  std::string path = write_temp("afm_gen_bad.json", R"({"top_k": 50,)");
  try {
    load_generation_config(path);
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("malformed JSON"), std::string::npos) << msg;
  }
}

TEST(GenerationConfigFile, WrongTypesAndInvalidValuesThrow) {
  EXPECT_THROW(parse_generation_config("[1, 2]", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"temperature": "hot"})", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"top_k": 2.5})", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"do_sample": 1})", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"eos_token_id": "</s>"})", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"eos_token_id": [1, -2]})", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"max_new_tokens": 0})", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"top_p": 0})", "t"), Error);
  EXPECT_THROW(parse_generation_config(R"({"temperature": -1})", "t"), Error);
  try {
    parse_generation_config(R"({"top_p": 1.2})", "gc.json");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "gc.json: top_p must be in (0, 1], got 1.2");
  }
}

// ---------------------------------------------------------------- OpenAI presence / frequency penalties
//
// A token this sampler has drawn n > 0 times loses presence_penalty + frequency_penalty * n from
// its logit, before temperature. Expected choices are worked out by hand next to each case.

namespace {
std::vector<int32_t> greedy_draws(const SamplingParams& p, const std::vector<float>& logits, int count) {
  Sampler s(p);
  std::vector<int32_t> out;
  for (int i = 0; i < count; i++) out.push_back(s.sample(logits, {}));
  return out;
}
}  // namespace

TEST(SamplerPenalties, PresencePenaltyTurnsTheSecondGreedyDraw) {
  const std::vector<float> logits = {2.0f, 1.9f, 0.0f};
  SamplingParams p;  // greedy
  EXPECT_EQ(greedy_draws(p, logits, 4), (Ids{0, 0, 0, 0}));
  p.presence_penalty = 0.2f;
  // 2.0 > 1.9: 0. Then 1.8 < 1.9: 1. Then 1.8 > 1.7: 0, and both stay penalised once: 0, 0.
  EXPECT_EQ(greedy_draws(p, logits, 5), (Ids{0, 1, 0, 0, 0}));
}

TEST(SamplerPenalties, FrequencyPenaltyGrowsWithTheCount) {
  const std::vector<float> logits = {2.0f, 1.75f, 0.0f};
  SamplingParams p;
  p.frequency_penalty = 0.15f;
  // Draw 1: 2.0 > 1.75 -> 0. Draw 2: 2.0 - 0.15 = 1.85 > 1.75 -> 0 (once is not enough).
  // Draw 3: 2.0 - 0.30 = 1.70 < 1.75 -> 1. Draw 4: 1.70 > 1.75 - 0.15 = 1.60 -> 0.
  // Draw 5: 2.0 - 0.45 = 1.55 < 1.60 -> 1.
  EXPECT_EQ(greedy_draws(p, logits, 5), (Ids{0, 0, 1, 0, 1}));
}

TEST(SamplerPenalties, PresenceAndFrequencyAdd) {
  const std::vector<float> logits = {2.0f, 1.5f};
  SamplingParams p;
  p.presence_penalty = 0.2f;  // alone: 1.8 > 1.5 forever
  EXPECT_EQ(greedy_draws(p, logits, 4), (Ids{0, 0, 0, 0}));
  p.presence_penalty = 0.0f;
  p.frequency_penalty = 0.2f;  // alone: 1.8, 1.6, then 1.4 < 1.5
  EXPECT_EQ(greedy_draws(p, logits, 4), (Ids{0, 0, 0, 1}));
  p.presence_penalty = 0.2f;  // together: 2 - 0.4 = 1.6, then 2 - 0.2 - 0.4 = 1.4 < 1.5
  EXPECT_EQ(greedy_draws(p, logits, 3), (Ids{0, 0, 1}));
}

TEST(SamplerPenalties, NegativePenaltiesEncourageRepeats) {
  const std::vector<float> first = {2.0f, 0.0f}, then = {1.0f, 1.5f};
  SamplingParams p;
  p.presence_penalty = -1.0f;
  Sampler s(p);
  EXPECT_EQ(s.sample(first, {}), 0);
  EXPECT_EQ(s.sample(then, {}), 0);  // 1.0 + 1.0 = 2.0 > 1.5
  EXPECT_EQ(Sampler(SamplingParams{}).sample(then, {}), 1);
}

TEST(SamplerPenalties, OnlyDrawnTokensArePenalisedNotTheContext) {
  const std::vector<float> logits = {2.0f, 1.9f};
  SamplingParams p;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.5f;
  Sampler s(p);
  const std::vector<int32_t> context = {0, 0, 0};  // the prompt repeats token 0
  EXPECT_EQ(s.sample(logits, context), 0);
  EXPECT_EQ(s.sample(logits, context), 1);  // now it was drawn: 2.0 - 1.0 < 1.9
  // A fresh sampler has drawn nothing: no penalty, whatever the context.
  EXPECT_EQ(Sampler(p).sample(logits, context), 0);
}

TEST(SamplerPenalties, SubtractedBeforeTemperature) {
  SamplingParams p = sampling(0.5f);
  p.presence_penalty = 0.5f;
  Sampler s(p);
  // Token 1's probability is exp(-20) ~ 2e-9: the draw is token 0.
  ASSERT_EQ(s.sample(std::vector<float>{10.0f, 0.0f}, {}), 0);
  // Scores ((1.0 - 0.5) / 0.5, 0 / 0.5) = (1, 0): softmax (0.7310586, 0.2689414). Subtracting
  // after temperature would give (1.5, 0): (0.8175745, 0.1824255).
  std::span<const Candidate> c = s.candidates(std::vector<float>{1.0f, 0.0f}, {});
  ASSERT_EQ(c.size(), 2u);
  EXPECT_NEAR(c[0].prob, 0.73105858, 2e-6);
  EXPECT_NEAR(c[1].prob, 0.26894142, 2e-6);
  // candidates() alone draws nothing, so asking again gives the same distribution.
  c = s.candidates(std::vector<float>{1.0f, 0.0f}, {});
  EXPECT_NEAR(c[0].prob, 0.73105858, 2e-6);
}

TEST(SamplerPenalties, ValidateAcceptsMinusTwoToTwoOnly) {
  for (float ok : {-2.0f, -0.5f, 0.0f, 1.0f, 2.0f}) {
    SamplingParams p;
    p.presence_penalty = ok;
    EXPECT_NO_THROW(validate(p)) << ok;
    p.presence_penalty = 0;
    p.frequency_penalty = ok;
    EXPECT_NO_THROW(validate(p)) << ok;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (float bad : {-2.01f, 2.01f, 3.0f, -100.0f, nan, inf, -inf}) {
    SamplingParams p;
    p.presence_penalty = bad;
    EXPECT_THROW(validate(p), Error) << "presence " << bad;
    EXPECT_THROW(Sampler{p}, Error) << "presence " << bad;
    p.presence_penalty = 0;
    p.frequency_penalty = bad;
    EXPECT_THROW(validate(p), Error) << "frequency " << bad;
    EXPECT_THROW(Sampler{p}, Error) << "frequency " << bad;
  }
  try {
    SamplingParams p;
    p.frequency_penalty = 2.5f;
    validate(p, "req");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("frequency_penalty"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind("req: ", 0), 0u) << e.what();
  }
}
