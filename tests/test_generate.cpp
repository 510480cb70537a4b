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

// ---------------------------------------------------------------- TokenGenerator
//
// Hand-made logits rows (one-hot) force the greedy choice at each step, so the expected tokens,
// texts and finish reasons follow from the rules in generate.h alone.

namespace {

const afm::Tokenizer& tokenizer() {
  static afm::Tokenizer t = afm::Tokenizer::load(kModel + "/tokenizer.json");
  return t;
}

// A logits row over the vocabulary whose argmax is `id`.
std::vector<float> forcing(int32_t id) {
  std::vector<float> row(size_t(tokenizer().vocab_size()), 0.0f);
  row[size_t(id)] = 5.0f;
  return row;
}

struct Forced {
  std::vector<std::string> chunks;  // what each step returned
  std::string text;
  int steps = 0;
};

// Steps `generator` with each of `ids` forced, until it finishes or the ids run out.
Forced force(afm::TokenGenerator& generator, std::span<const int32_t> ids) {
  Forced run;
  for (int32_t id : ids) {
    if (generator.finished()) break;
    const std::string chunk = generator.step(forcing(id));
    EXPECT_EQ(generator.last_token(), id);
    run.chunks.push_back(chunk);
    run.text += chunk;
    run.steps++;
  }
  return run;
}

afm::GenerateOptions limited(int max_new_tokens) {
  afm::GenerateOptions options;
  options.max_new_tokens = max_new_tokens;
  return options;
}

const std::vector<int32_t> kPrompt = {4096, 13, 1122};  // <|begin_of_text|> . Emma

std::vector<int32_t> concat(std::vector<int32_t> a, std::span<const int32_t> b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

TEST(TokenGenerator, StreamsTheForcedTokensAndStopsAtTheTokenLimit) {
  const std::string want = " It is a truth universally acknowledged, said Emma.";
  const std::vector<int32_t> ids = tokenizer().encode(want, false);
  ASSERT_GT(ids.size(), 5u);
  afm::TokenGenerator generator(tokenizer(), kPrompt, limited(int(ids.size())), 512);
  EXPECT_FALSE(generator.finished());
  EXPECT_EQ(generator.tokens(), kPrompt);
  std::vector<int32_t> more = ids;
  more.push_back(ids[0]);  // one more than the limit: never stepped
  const Forced run = force(generator, more);
  EXPECT_EQ(run.steps, int(ids.size()));
  EXPECT_EQ(run.text, want);
  EXPECT_TRUE(generator.finished());
  EXPECT_EQ(generator.finish_reason(), "length");
  EXPECT_EQ(generator.generated_tokens(), int64_t(ids.size()));
  EXPECT_EQ(generator.tokens(), concat(kPrompt, ids));
  EXPECT_EQ(generator.last_token(), ids.back());
  EXPECT_THROW(generator.step(forcing(ids[0])), afm::Error);
  EXPECT_EQ(generator.generated_tokens(), int64_t(ids.size()));  // the refused step changed nothing
}

TEST(TokenGenerator, EosEndsTheSequenceAndIsNotEmitted) {
  const std::vector<int32_t> ids = tokenizer().encode(" said Emma", false);
  const int32_t eos = 13;  // ".": an ordinary token, so emitting it would show in the text
  afm::GenerateOptions options = limited(100);
  options.eos_token_ids = {4097, eos};
  afm::TokenGenerator generator(tokenizer(), kPrompt, options, 512);
  const Forced run = force(generator, concat(ids, std::vector<int32_t>{eos, 1113}));
  EXPECT_EQ(run.steps, int(ids.size()) + 1);
  EXPECT_EQ(run.text, " said Emma");
  EXPECT_EQ(run.chunks.back(), "");
  EXPECT_EQ(generator.finish_reason(), "eos");
  EXPECT_EQ(generator.generated_tokens(), int64_t(ids.size()) + 1);  // eos counts, as in HF
  EXPECT_EQ(generator.tokens(), concat(kPrompt, ids));                // but is not in the context
  EXPECT_EQ(generator.last_token(), eos);
  EXPECT_THROW(generator.step(forcing(eos)), afm::Error);
}

TEST(TokenGenerator, EosOnTheLastAllowedTokenIsStillEos) {
  afm::GenerateOptions options = limited(1);
  options.eos_token_ids = {4097};
  afm::TokenGenerator generator(tokenizer(), kPrompt, options, 512);
  EXPECT_EQ(generator.step(forcing(4097)), "");
  EXPECT_EQ(generator.finish_reason(), "eos");
  EXPECT_EQ(generator.tokens(), kPrompt);
}

TEST(TokenGenerator, EosFlushesTextHeldBackForAStopString) {
  afm::GenerateOptions options = limited(100);
  options.eos_token_ids = {4097};
  options.stop_strings = {", said"};
  const std::vector<int32_t> ids = tokenizer().encode(" Emma,", false);
  afm::TokenGenerator generator(tokenizer(), kPrompt, options, 512);
  const Forced run = force(generator, concat(ids, std::vector<int32_t>{4097}));
  EXPECT_EQ(generator.finish_reason(), "eos");
  EXPECT_EQ(run.text, " Emma,");        // the "," waited for a possible " said", then came out
  EXPECT_EQ(run.chunks.back(), ",");   // at the eos step
}

TEST(TokenGenerator, StopStringEndsTheTextBeforeIt) {
  const std::string full = " It is a truth, said Emma, universally acknowledged";
  const std::vector<int32_t> ids = tokenizer().encode(full, false);
  afm::GenerateOptions options = limited(100);
  options.stop_strings = {"never", ", said"};
  // The step that completes ", said": the first prefix of the ids whose text contains it.
  size_t completes = 0;
  while (tokenizer().decode(std::span(ids).first(completes + 1), true).find(", said") == std::string::npos)
    completes++;
  ASSERT_LT(completes + 1, ids.size());

  afm::TokenGenerator generator(tokenizer(), kPrompt, options, 512);
  const Forced run = force(generator, ids);
  EXPECT_EQ(generator.finish_reason(), "stop");
  EXPECT_EQ(run.steps, int(completes) + 1);
  EXPECT_EQ(run.text, " It is a truth");
  EXPECT_EQ(generator.generated_tokens(), int64_t(completes) + 1);
  EXPECT_THROW(generator.step(forcing(ids[0])), afm::Error);
}

TEST(TokenGenerator, ContextLimitEndsWhenNoPositionIsLeftToFeed) {
  // 3 prompt tokens in a context of 6 positions: tokens 4, 5 and 6 can be fed; the 4th generated
  // one (the 7th token) has no position, so generation ends as it is picked.
  const std::vector<int32_t> ids = tokenizer().encode(" It is a truth universally acknowledged", false);
  ASSERT_GE(ids.size(), 5u);
  afm::TokenGenerator generator(tokenizer(), kPrompt, limited(100), 6);
  const Forced run = force(generator, ids);
  EXPECT_EQ(run.steps, 4);
  EXPECT_EQ(generator.finish_reason(), "length");
  EXPECT_EQ(generator.tokens().size(), 7u);
  EXPECT_EQ(run.text, tokenizer().decode(std::span(ids).first(4), true));

  // A prompt that fills the context gets exactly one token.
  afm::TokenGenerator full(tokenizer(), kPrompt, limited(100), 3);
  EXPECT_EQ(force(full, ids).steps, 1);
  EXPECT_EQ(full.finish_reason(), "length");
}

TEST(TokenGenerator, ZeroNewTokensIsFinishedFromTheStart) {
  afm::TokenGenerator generator(tokenizer(), kPrompt, limited(0), 512);
  EXPECT_TRUE(generator.finished());
  EXPECT_EQ(generator.finish_reason(), "length");
  EXPECT_EQ(generator.generated_tokens(), 0);
  EXPECT_EQ(generator.tokens(), kPrompt);
  EXPECT_THROW(generator.step(forcing(13)), afm::Error);
}

TEST(TokenGenerator, MultiByteCharactersStreamWhole) {
  const std::string want = " café naïve — “quoted”";
  const std::vector<int32_t> ids = tokenizer().encode(want, false);
  afm::TokenGenerator generator(tokenizer(), kPrompt, limited(int(ids.size())), 512);
  const Forced run = force(generator, ids);
  EXPECT_EQ(run.text, want);
  // No chunk ends inside a UTF-8 sequence: its last lead byte has all its continuation bytes.
  for (const std::string& chunk : run.chunks) {
    size_t i = chunk.size();
    while (i > 0 && (uint8_t(chunk[i - 1]) & 0xC0) == 0x80) i--;
    if (i == 0) {
      EXPECT_TRUE(chunk.empty()) << "a chunk of continuation bytes only";
      continue;
    }
    const uint8_t lead = uint8_t(chunk[i - 1]);
    const size_t need = lead < 0x80 ? 1 : lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
    EXPECT_EQ(chunk.size() - (i - 1), need) << "chunk \"" << chunk << "\"";
  }
}

TEST(TokenGenerator, PromptAndGeneratedTokensAreTheRepetitionContext) {
  // Greedy with repetition penalty 2: a token in the context scores half (positive logits).
  afm::GenerateOptions options = limited(3);
  options.sampling.repetition_penalty = 2.0f;
  afm::TokenGenerator generator(tokenizer(), kPrompt, options, 512);
  std::vector<float> row(size_t(tokenizer().vocab_size()), 0.0f);
  row[1122] = 3.0f;  // " Emma", in the prompt: 1.5
  row[1113] = 2.0f;  // " world": 2.0, then 1.0 once generated
  row[415] = 1.2f;   // " said"
  generator.step(row);
  EXPECT_EQ(generator.last_token(), 1113);
  generator.step(row);  // 1.5 (Emma) > 1.2 (said) > 1.0 (world, now in the context)
  EXPECT_EQ(generator.last_token(), 1122);
  generator.step(row);  // HF penalises a repeated token once: Emma stays 1.5
  EXPECT_EQ(generator.last_token(), 1122);
  EXPECT_EQ(generator.tokens(), concat(kPrompt, std::vector<int32_t>{1113, 1122, 1122}));
}
