// The generate loop: HF's greedy continuations, session reuse, stop strings, limits.
#include <gtest/gtest.h>

#include "error.h"
#include "eval.h"
#include "generate.h"

namespace {

const std::string kModel = std::string(AFM_SOURCE_DIR) + "/models/afm-tiny-austen";
const std::string kReference = std::string(AFM_SOURCE_DIR) + "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors";

struct Engine {
  std::unique_ptr<afm::Model> model = afm::build_model(kModel, afm::Device::cpu(), 512);
  afm::Tokenizer tokenizer = afm::Tokenizer::load(kModel + "/tokenizer.json");
};

Engine& engine() {
  static Engine e;
  return e;
}

afm::GenerateOptions greedy(int max_new_tokens) {
  afm::GenerateOptions options;
  options.max_new_tokens = max_new_tokens;
  return options;
}

TEST(Generate, GreedyTextIsHfsGreedyContinuation) {
  afm::Reference reference = afm::load_reference(kReference);
  for (const afm::PromptReference& prompt : reference.prompts) {
    afm::Session session(*engine().model);
    std::string text;
    auto stats = afm::generate(*engine().model, engine().tokenizer, session, prompt.ids,
                               greedy(int(prompt.generated.size())), [&](std::string_view t) { text += t; });
    // The reference tokens decoded, as HF's tokenizer.decode(generated) gives them.
    EXPECT_EQ(text, engine().tokenizer.decode(prompt.generated, true));
    EXPECT_EQ(stats.generated_tokens, int64_t(prompt.generated.size()));
    EXPECT_EQ(stats.finish_reason, "length");
    // The cache holds the prompt and every generated token but the last one sampled.
    EXPECT_EQ(session.cache->length(), int64_t(prompt.ids.size() + prompt.generated.size() - 1));
  }
}

TEST(Generate, SecondTurnReusesTheCachedPrefixAndMatchesAFreshRun) {
  afm::Reference reference = afm::load_reference(kReference);
  const std::vector<int32_t>& ids = reference.prompts[0].ids;
  std::vector<int32_t> first(ids.begin(), ids.begin() + 60);

  afm::Session session(*engine().model);
  afm::generate(*engine().model, engine().tokenizer, session, first, greedy(5), [](std::string_view) {});
  std::string reused, fresh;
  auto stats = afm::generate(*engine().model, engine().tokenizer, session, ids, greedy(20),
                             [&](std::string_view t) { reused += t; });
  // The first 60 tokens are shared; the session's next 4 (generated) may agree with the prompt too.
  EXPECT_GE(stats.cached_prompt_tokens, 60);
  EXPECT_LE(stats.cached_prompt_tokens, 64);

  afm::Session fresh_session(*engine().model);
  afm::generate(*engine().model, engine().tokenizer, fresh_session, ids, greedy(20),
                [&](std::string_view t) { fresh += t; });
  EXPECT_EQ(reused, fresh);
  EXPECT_EQ(reused, engine().tokenizer.decode(std::span(reference.prompts[0].generated).first(20), true));
}

TEST(Generate, StopsAtEosWithoutEmittingIt) {
  afm::Reference reference = afm::load_reference(kReference);
  const afm::PromptReference& prompt = reference.prompts[1];
  afm::GenerateOptions options = greedy(50);
  options.eos_token_ids = {prompt.generated[3]};  // pretend the 4th greedy token ends the text
  afm::Session session(*engine().model);
  std::string text;
  auto stats = afm::generate(*engine().model, engine().tokenizer, session, prompt.ids, options,
                             [&](std::string_view t) { text += t; });
  EXPECT_EQ(stats.finish_reason, "eos");
  EXPECT_EQ(stats.generated_tokens, 4);
  EXPECT_EQ(text, engine().tokenizer.decode(std::span(prompt.generated).first(3), true));
}

TEST(Generate, StopStringEndsTheTextBeforeIt) {
  afm::Reference reference = afm::load_reference(kReference);
  const afm::PromptReference& prompt = reference.prompts[1];
  const std::string full = engine().tokenizer.decode(prompt.generated, true);
  const std::string stop = full.substr(full.size() / 2, 6);
  afm::GenerateOptions options = greedy(int(prompt.generated.size()));
  options.stop_strings = {"never appears", stop};
  afm::Session session(*engine().model);
  std::string text;
  auto stats = afm::generate(*engine().model, engine().tokenizer, session, prompt.ids, options,
                             [&](std::string_view t) { text += t; });
  EXPECT_EQ(stats.finish_reason, "stop");
  EXPECT_EQ(text, full.substr(0, full.find(stop)));
}

TEST(Generate, PromptLongerThanTheContextIsAClearError) {
  auto model = afm::build_model(kModel, afm::Device::cpu(), 8);
  afm::Session session(*model);
  std::vector<int32_t> prompt(9, 100);
  try {
    afm::generate(*model, engine().tokenizer, session, prompt, greedy(4), [](std::string_view) {});
    FAIL() << "expected afm::Error";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("the prompt has 9 tokens but the context holds 8"), std::string::npos)
        << e.what();
  }
}

TEST(Generate, GenerationEndsWhenTheContextIsFull) {
  auto model = afm::build_model(kModel, afm::Device::cpu(), 16);
  afm::Session session(*model);
  std::vector<int32_t> prompt = engine().tokenizer.encode("It is a truth", true);
  auto stats = afm::generate(*model, engine().tokenizer, session, prompt, greedy(100), [](std::string_view) {});
  EXPECT_EQ(stats.finish_reason, "length");
  EXPECT_EQ(int64_t(prompt.size()) + stats.generated_tokens, 17);  // 16 cached positions + the last sample
}

TEST(StopStringFilter, HoldsBackPossibleStartsOfAStop) {
  afm::StopStringFilter filter({"END"});
  EXPECT_EQ(filter.push("abc E"), "abc ");
  EXPECT_EQ(filter.push("N"), "");
  EXPECT_EQ(filter.push("x"), "ENx");  // not a stop after all
  EXPECT_EQ(filter.push("yyEND and more"), "yy");
  EXPECT_TRUE(filter.stopped());
  EXPECT_EQ(filter.push("later"), "");
  EXPECT_EQ(filter.flush(), "");
}

TEST(StopStringFilter, FlushReleasesAHeldTailWhenNoStopCame) {
  afm::StopStringFilter filter({"\n\n", "###"});
  EXPECT_EQ(filter.push("line\n"), "line");
  EXPECT_EQ(filter.push("##"), "\n");
  EXPECT_FALSE(filter.stopped());
  EXPECT_EQ(filter.flush(), "##");
}

}  // namespace
