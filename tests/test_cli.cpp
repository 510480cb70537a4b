// The afm command line as a user runs it: output formats, HF's greedy text, and error messages.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "support/subprocess.h"

namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

const std::string kRepo = AFM_SOURCE_DIR;

using afm::test::Result;

Result afm(const std::string& args, bool with_stderr = false, const std::string& stdin_text = "") {
  std::string command = std::string(AFM_BINARY) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
  if (!stdin_text.empty()) {
    const std::string input = ::testing::TempDir() + "/afm_cli_stdin.txt";
    std::ofstream(input) << stdin_text;
    command += " < " + input;
  } else {
    command += " < /dev/null";
  }
  return afm::test::run_command(command);
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

TEST(Cli, GreedyGenerateEqualsHfsSamples) {
  // HF's own greedy samples of the embedded model, 60 new tokens each.
  for (const json& sample : read_json(kRepo + "/models/afm-tiny-austen/samples.json")) {
    if (!sample.contains("greedy")) continue;
    const std::string prompt = sample["prompt"];
    Result run = afm("generate --prompt '" + prompt + "' --weights f32 --temperature 0 --max-new-tokens 60");
    EXPECT_EQ(run.status, 0);
    EXPECT_EQ(run.out, sample["greedy"].get<std::string>() + "\n") << prompt;
  }
}

TEST(Cli, GenerateReportsTheNotesTimings) {
  Result run = afm("generate --prompt 'Elizabeth' --seed 3 -n 8", true);
  EXPECT_EQ(run.status, 0);
  EXPECT_THAT(run.out, HasSubstr("prompt tokens: 2"));
  EXPECT_THAT(run.out, HasSubstr("generated tokens: 8"));
  EXPECT_THAT(run.out, HasSubstr("TTFT:"));
  EXPECT_THAT(run.out, HasSubstr("tokens/s per user"));
}

TEST(Cli, SeededSamplingIsReproducible) {
  Result a = afm("generate --prompt 'Elizabeth' --seed 11 -n 30");
  Result b = afm("generate --prompt 'Elizabeth' --seed 11 -n 30");
  Result c = afm("generate --prompt 'Elizabeth' --seed 12 -n 30");
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);
}

TEST(Cli, TokenizeAndDetokenizeRoundTrip) {
  const json reference = read_json(kRepo + "/tests/fixtures/tokenizer-austen-4k/reference.json");
  const json& first = reference["cases"][0];
  const std::string text = first["text"];
  const std::string file = ::testing::TempDir() + "/afm_cli_text.txt";
  std::ofstream(file) << text;
  Result with_special = afm("tokenize --file " + file);
  Result plain = afm("tokenize --no-special --file " + file);
  ASSERT_EQ(with_special.status, 0);
  EXPECT_EQ(json::parse(with_special.out), first["ids_with_special"]);
  EXPECT_EQ(json::parse(plain.out), first["ids"]);
  Result back = afm("detokenize '" + plain.out.substr(0, plain.out.size() - 1) + "'");
  EXPECT_EQ(back.out, text + "\n");
}

TEST(Cli, EvalJsonHasTheDocumentedKeys) {
  Result run = afm("eval --json --weights f32 --reference " + kRepo + "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors");
  ASSERT_EQ(run.status, 0);
  json out = json::parse(run.out);
  for (const char* key : {"top1", "top5", "prefill_max_rel_err", "decode_max_rel_err"}) EXPECT_TRUE(out.contains(key)) << key;
  EXPECT_EQ(out["top1"], 1.0);
  ASSERT_EQ(out["prompts"].size(), 3u);
  EXPECT_TRUE(out["prompts"][0].contains("top5"));
}

TEST(Cli, EvalComparesWeightFormatsAndDefaultsToBfp8) {
  const std::string reference = kRepo + "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors";
  json several = json::parse(afm("eval --json --weights f32,bfp8 --reference " + reference).out);
  EXPECT_EQ(several["formats"]["f32"]["top1"], 1.0);
  EXPECT_GE(several["formats"]["bfp8"]["top1"].get<double>(), 0.98);
  json by_default = json::parse(afm("eval --json --reference " + reference).out);
  EXPECT_EQ(by_default["weights"], "bfp8");
  EXPECT_EQ(by_default["top1"], several["formats"]["bfp8"]["top1"]);
}

TEST(Cli, EvalMaxNewTokensLimitsTheStepsOfEveryPrompt) {
  json out = json::parse(afm("eval --json --weights f32 -n 5 --reference " + kRepo +
                             "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors")
                             .out);
  for (const json& prompt : out["prompts"]) EXPECT_EQ(prompt["steps"], 5);
}

TEST(Cli, EvalRefusesAReferenceThatDoesNotFitTheModel) {
  Result run = afm("eval --max-seq-len 64 --reference " + kRepo +
                    "/tests/fixtures/afm-tiny-austen-reference/reference.safetensors",
                true);
  EXPECT_EQ(run.status, 1);
  EXPECT_THAT(run.out, HasSubstr("needs 218 positions but the model was built with max_seq_len 64"));
}

TEST(Cli, AModelOverTheMemoryBudgetIsRefusedSayingWhatToLower) {
  // afm-tiny-austen: 6.2M parameters, 25 MB of f32 weights.
  Result run = afm("generate --weights f32 --max-memory 4M -n 2 -p Hello", true);
  EXPECT_EQ(run.status, 1);
  EXPECT_THAT(run.out, HasSubstr("as f32"));
  EXPECT_THAT(run.out, HasSubstr("is the --max-memory budget: use smaller --weights"));
  EXPECT_EQ(afm("generate --weights f32 --max-memory 1G -n 2 -p Hello", true).status, 0);
  Result bad = afm("generate --max-memory lots -p Hello", true);
  EXPECT_EQ(bad.status, 1);
  EXPECT_THAT(bad.out, HasSubstr("expected a size such as 8G"));
}

TEST(Cli, ChatAnswersEachTurnAndResets) {
  Result run = afm("chat -n 6 --seed 5", true, "Good morning\nAnd to you?\n/reset\nHello\n");
  EXPECT_EQ(run.status, 0);
  EXPECT_THAT(run.out, HasSubstr("(conversation cleared)"));
  // Three turns, three reports; the second turn reuses the first turn's cache.
  size_t reports = 0;
  for (size_t at = run.out.find("generated tokens"); at != std::string::npos; at = run.out.find("generated tokens", at + 1))
    reports++;
  EXPECT_EQ(reports, 3u);
  EXPECT_THAT(run.out, ::testing::ContainsRegex("prompt tokens: [0-9]+ \\([1-9][0-9]* cached\\)"));
}

TEST(Cli, ErrorsSayWhatToDo) {
  Result unknown_flag = afm("generate --prompt hi --bogus", true);
  EXPECT_NE(unknown_flag.status, 0);  // CLI11's own exit code for parse errors
  EXPECT_THAT(unknown_flag.out, HasSubstr("--bogus"));

  // Bad input that the library rejects: exit status 1 and a message naming the remedy.
  const std::pair<std::string, std::string> cases[] = {
      {"generate --model /nonexistent/model --prompt hi", "/nonexistent/model"},
      {"generate --max-seq-len 8 --prompt 'one two three four five six seven eight nine ten'",
       "shorten the prompt or raise --max-seq-len"},
      {"generate", "--prompt"},
      {"generate --prompt hi --weights fp7", "unknown weight format \"fp7\""},
      {"generate --prompt hi --stop ''", "--stop needs a non-empty string"},
      {"generate --prompt hi --max-seq-len 3000000000", "max_seq_len must be between"},
      {"detokenize '[1, 99999]'", "99999"},
  };
  for (const auto& [args, message] : cases) {
    Result run = afm(args, true);
    EXPECT_EQ(run.status, 1) << args;
    EXPECT_THAT(run.out, HasSubstr(message)) << args;
  }
}

}  // namespace
