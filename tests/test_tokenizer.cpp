// Tokenizer tests against HF's own outputs (tests/fixtures/tokenizer-*/reference.json, made with
// tokenizers 0.23.2): every case must match exactly.
#include "tokenizer.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "error.h"

namespace {

using nlohmann::json;

std::string fixture(const std::string& name) { return AFM_SOURCE_DIR "/tests/fixtures/" + name; }

json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}

// Loading Llama-3 parses 9 MB of JSON; do it once for the whole test program.
const afm::Tokenizer& tokenizer(const std::string& name) {
  static std::map<std::string, afm::Tokenizer> loaded;
  auto it = loaded.find(name);
  if (it == loaded.end())
    it = loaded.emplace(name, afm::Tokenizer::load(fixture(name + "/tokenizer.json"))).first;
  return it->second;
}

std::vector<int32_t> to_ids(const json& j) { return j.get<std::vector<int32_t>>(); }

// Valid UTF-8 with no U+FFFD: the streamed pieces of a valid text must never split a character.
bool is_clean_utf8(const std::string& s) {
  std::string repaired;
  afm::append_utf8_lossy(s, repaired);
  return repaired == s && s.find("\xEF\xBF\xBD") == std::string::npos;
}

class ReferenceTest : public testing::TestWithParam<const char*> {};

TEST_P(ReferenceTest, MatchesHuggingFaceExactly) {
  const std::string name = GetParam();
  const afm::Tokenizer& tok = tokenizer(name);
  json ref = read_json(fixture(name + "/reference.json"));
  EXPECT_EQ(tok.vocab_size(), ref["vocab_size"].get<int32_t>());
  ASSERT_EQ(ref["cases"].size(), 62u);
  for (const json& c : ref["cases"]) {
    const std::string text = c["text"];
    SCOPED_TRACE("text: " + json(text).dump().substr(0, 200));
    std::vector<int32_t> ids = to_ids(c["ids"]);
    EXPECT_EQ(tok.encode(text, false), ids);
    EXPECT_EQ(tok.encode(text, true), to_ids(c["ids_with_special"]));
    EXPECT_EQ(tok.decode(ids, false), c["decoded"].get<std::string>());
    EXPECT_EQ(tok.decode(ids, true), c["decoded_skip_special"].get<std::string>());
    std::vector<std::string> tokens;
    for (int32_t id : ids) tokens.push_back(tok.token_text(id));
    EXPECT_EQ(tokens, c["tokens"].get<std::vector<std::string>>());
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ReferenceTest,
                         testing::Values("tokenizer-austen-4k", "tokenizer-llama3"),
                         [](const auto& info) {
                           return std::string(info.param) == "tokenizer-llama3" ? "Llama3" : "Austen4k";
                         });

TEST(Tokenizer, Lookups) {
  const afm::Tokenizer& tok = tokenizer("tokenizer-llama3");
  EXPECT_EQ(tok.vocab_size(), 128256);
  EXPECT_EQ(tok.token_id("<|begin_of_text|>"), 128000);
  EXPECT_EQ(tok.token_id("<|eot_id|>"), 128009);
  EXPECT_EQ(tok.token_id("Hello"), 9906);
  EXPECT_EQ(tok.token_id("no such token"), std::nullopt);
  EXPECT_EQ(tok.token_text(1917), "Ġworld");
  EXPECT_EQ(tok.token_text(128001), "<|end_of_text|>");
  EXPECT_TRUE(tok.is_special(128000));
  EXPECT_FALSE(tok.is_special(9906));
  EXPECT_FALSE(tok.is_special(-1));
  EXPECT_THROW(tok.token_text(128256), afm::Error);
  EXPECT_THROW(tok.token_text(-1), afm::Error);

  const afm::Tokenizer& small = tokenizer("tokenizer-austen-4k");
  EXPECT_EQ(small.vocab_size(), 4101);
  EXPECT_EQ(small.token_id("<|im_end|>"), 4099);
  EXPECT_TRUE(small.is_special(4100));
}

TEST(Tokenizer, DecodeSkipsUnknownIdsAndRepairsUtf8) {
  const afm::Tokenizer& tok = tokenizer("tokenizer-llama3");
  std::vector<int32_t> ids = tok.encode("日本", false);
  ASSERT_GE(ids.size(), 1u);
  std::vector<int32_t> with_junk = {-5, 9906, 999999};
  EXPECT_EQ(tok.decode(with_junk, false), "Hello");
  // A lone byte token (0xE6, the first byte of 日) cannot be decoded: U+FFFD, as HF.
  std::vector<int32_t> lone = {*tok.token_id("æ")};
  EXPECT_EQ(tok.decode(lone, false), "\xEF\xBF\xBD");
}

TEST(Tokenizer, RejectsInvalidUtf8) {
  EXPECT_THROW(tokenizer("tokenizer-austen-4k").encode("abc\xFF", false), afm::Error);
  EXPECT_THROW(tokenizer("tokenizer-austen-4k").encode("\xE6\x97", false), afm::Error);
}

TEST(Tokenizer, LongInputs) {
  // Long runs stress the regex (backtracking in \s+(?!\S)) and the merge heap.
  const afm::Tokenizer& tok = tokenizer("tokenizer-llama3");
  for (const std::string& text : {std::string(200000, ' '), std::string(100000, 'a'),
                                  std::string(50000, '\n') + "x", std::string(30000, '7')}) {
    std::vector<int32_t> ids = tok.encode(text, false);
    EXPECT_EQ(tok.decode(ids, false), text);
  }
}

TEST(Utf8Lossy, MatchesRustReplacementRules) {
  auto lossy = [](std::string_view s) {
    std::string out;
    afm::append_utf8_lossy(s, out);
    return out;
  };
  const std::string fffd = "\xEF\xBF\xBD";
  EXPECT_EQ(lossy("a\xE6\x97" "b"), "a" + fffd + "b");           // truncated 3-byte sequence
  EXPECT_EQ(lossy("\xE6\x97"), fffd);                             // truncated at the end
  EXPECT_EQ(lossy("\xC0\x80"), fffd + fffd);                      // overlong lead
  EXPECT_EQ(lossy("\xED\xA0\x80"), fffd + fffd + fffd);           // surrogate
  EXPECT_EQ(lossy("\xF0\x9F\x98"), fffd);                         // 3 of 4 bytes
  EXPECT_EQ(lossy("\x80\x80"), fffd + fffd);                      // stray continuations
  EXPECT_EQ(lossy("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");       // 😀 intact
}

// Streaming: concatenated pushes equal decode(), and no push returns part of a character.
TEST(StreamDecoder, MatchesDecodeWithoutSplittingCharacters) {
  const std::vector<std::string> texts = {
      "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
      "日本語のテキストです。中文文本。한국어 텍스트",
      "हिन्दी पाठ and مرحبا بالعالم",
      "<|im_start|>user\nhi 𝔘𝔫𝔦𝔠𝔬𝔡𝔢<|im_end|>",
      "plain ASCII text, nothing special",
  };
  for (const char* name : {"tokenizer-austen-4k", "tokenizer-llama3"}) {
    const afm::Tokenizer& tok = tokenizer(name);
    for (const std::string& text : texts) {
      std::vector<int32_t> ids = tok.encode(text, true);
      for (bool skip : {false, true}) {
        SCOPED_TRACE(std::string(name) + " skip=" + std::to_string(skip) + " text: " + text);
        afm::StreamDecoder stream(tok, skip);
        std::string streamed;
        for (int32_t id : ids) {
          std::string piece = stream.push(id);
          EXPECT_TRUE(is_clean_utf8(piece)) << "push returned a broken character";
          streamed += piece;
        }
        EXPECT_EQ(stream.flush(), "");
        EXPECT_EQ(streamed, tok.decode(ids, skip));
      }
    }
  }
  // A sequence that ends mid-character: held back, then repaired by flush() as decode() would.
  const afm::Tokenizer& tok = tokenizer("tokenizer-llama3");
  std::vector<int32_t> ids = {9906, *tok.token_id("æ")};
  afm::StreamDecoder stream(tok);
  std::string out = stream.push(ids[0]);
  out += stream.push(ids[1]);
  EXPECT_EQ(out, "Hello");
  out += stream.flush();
  EXPECT_EQ(out, tok.decode(ids, true));
}

// --- errors --------------------------------------------------------------------------------

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const afm::Error& e) {
    return e.what();
  }
  return "no afm::Error thrown";
}

// A minimal valid tokenizer.json, with `patch` merged over it (RFC 7386 merge patch), except
// that a patched model.vocab replaces the default one instead of extending it.
std::string tokenizer_json(const json& patch) {
  json j = {
      {"version", "1.0"},
      {"added_tokens", json::array()},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}}}, {"merges", {"a b"}}}},
  };
  j.merge_patch(patch);
  if (patch.contains("model") && patch["model"].contains("vocab")) j["model"]["vocab"] = patch["model"]["vocab"];
  return j.dump();
}

TEST(TokenizerErrors, MissingFile) {
  std::string message = error_of([] { afm::Tokenizer::load("/nonexistent/tokenizer.json"); });
  EXPECT_NE(message.find("cannot open tokenizer file '/nonexistent/tokenizer.json'"), std::string::npos) << message;
}

TEST(TokenizerErrors, MalformedJson) {
  std::string message = error_of([] { afm::Tokenizer::from_json("{\"model\": {\"vocab\": {", "t.json"); });
  EXPECT_NE(message.find("t.json: malformed tokenizer JSON"), std::string::npos) << message;
  message = error_of([] { afm::Tokenizer::from_json("[1, 2]", "t.json"); });
  EXPECT_NE(message.find("malformed tokenizer JSON"), std::string::npos) << message;
}

TEST(TokenizerErrors, UnsupportedFeaturesAreNamed) {
  // load() from a real file, the way a user would hit it.
  std::string path = testing::TempDir() + "afm_unigram_tokenizer.json";
  std::ofstream(path) << tokenizer_json({{"model", {{"type", "Unigram"}}}});
  std::string message = error_of([&] { afm::Tokenizer::load(path); });
  EXPECT_NE(message.find(path + ": unsupported model type 'Unigram'"), std::string::npos) << message;
  std::filesystem::remove(path);

  auto error_for = [](const json& patch) {
    return error_of([&] { afm::Tokenizer::from_json(tokenizer_json(patch), "t.json"); });
  };
  EXPECT_NE(error_for({{"normalizer", {{"type", "NFC"}}}}).find("unsupported normalizer type 'NFC'"), std::string::npos);
  EXPECT_NE(error_for({{"pre_tokenizer", {{"type", "Metaspace"}}}}).find("unsupported pre_tokenizer type 'Metaspace'"), std::string::npos);
  EXPECT_NE(error_for({{"decoder", {{"type", "WordPiece"}}}}).find("unsupported decoder type 'WordPiece'"), std::string::npos);
  EXPECT_NE(error_for({{"post_processor", {{"type", "BertProcessing"}}}}).find("unsupported post_processor type 'BertProcessing'"), std::string::npos);
  EXPECT_NE(error_for({{"model", {{"dropout", 0.1}}}}).find("dropout"), std::string::npos);
  EXPECT_NE(error_for({{"model", {{"merges", {"a c"}}}}}).find("merge 'a c' uses a token missing"), std::string::npos);
  EXPECT_NE(error_for({{"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "(a"}}}, {"behavior", "Isolated"}}}})
                .find("cannot compile pre-tokenizer regex '(a'"), std::string::npos);
  EXPECT_NE(error_for({{"model", {{"vocab", "oops"}}}}).find("t.json:"), std::string::npos);
}

TEST(TokenizerErrors, HostileFilesAreRefusedBeforeTheyCostMemory) {
  // A 1 GB file (sparse: it takes no disk) is refused by its size, before any of it is read.
  std::string path = testing::TempDir() + "afm_huge_tokenizer.json";
  std::ofstream(path) << "{";
  std::filesystem::resize_file(path, size_t{1} << 30);
  std::string message = error_of([&] { afm::Tokenizer::load(path); });
  EXPECT_NE(message.find(path + ": the tokenizer JSON is larger than 128 MiB"), std::string::npos) << message;
  std::filesystem::remove(path);

  // Ids index tables, so a huge one would allocate gigabytes (and INT32_MAX + 1 overflowed).
  auto error_for = [](const json& patch) {
    return error_of([&] { afm::Tokenizer::from_json(tokenizer_json(patch), "t.json"); });
  };
  for (int64_t id : {int64_t{2097152}, int64_t{INT32_MAX}})
    EXPECT_NE(error_for({{"model", {{"vocab", {{"a", 0}, {"b", 1}, {"ab", id}}}}}}).find("model.vocab id of 'ab' is out of range"),
              std::string::npos);
  json added = {{"id", INT32_MAX}, {"content", "<x>"}};
  EXPECT_NE(error_for({{"added_tokens", {added}}}).find("added token id 2147483647 is out of range"), std::string::npos);

  // Counts: more merges than any real tokenizer, a huge DOM outside vocab and merges, deep nesting.
  std::string merges = R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [)";
  for (int i = 0; i <= (1 << 22); i++) merges += i ? R"(,"a b")" : R"("a b")";
  EXPECT_NE(error_of([&] { afm::Tokenizer::from_json(merges + "]}}", "t.json"); }).find("model.merges has more than 4194304 entries"),
            std::string::npos);
  std::string values = R"({"padding": [0)";
  for (int i = 0; i < (1 << 20); i++) values += ",0";
  EXPECT_NE(error_of([&] { afm::Tokenizer::from_json(values + "]}", "t.json"); }).find("more than 1048576 JSON values"),
            std::string::npos);
  json nested = {{"type", "ByteLevel"}};
  for (int i = 0; i < 100; i++) nested = {{"type", "Sequence"}, {"pretokenizers", {nested}}};
  EXPECT_NE(error_for({{"pre_tokenizer", nested}}).find("JSON nested deeper than 64 levels"), std::string::npos);
}

// --- smaller configurations the fixtures do not use ------------------------------------------

TEST(TokenizerConfigs, MergesAsPairsAndSplitBehaviors) {
  // Pairs instead of "a b" strings, no ignore_merges: "ab" must come from the merge.
  auto tok = afm::Tokenizer::from_json(tokenizer_json({{"model", {{"merges", json::array({json::array({"a", "b"})})}}}}), "t.json");
  EXPECT_EQ(tok.encode("abba", false), (std::vector<int32_t>{2, 1, 0}));

  // A Split on "-" with each behavior, then ByteLevel without its regex; "-" is id 3.
  auto split_ids = [](const char* behavior, bool invert) {
    json patch = {{"pre_tokenizer",
                   {{"type", "Sequence"},
                    {"pretokenizers",
                     {{{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}, {"invert", invert}},
                      {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
                  {"model", {{"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"-", 3}, {"a-", 4}, {"-b", 5}, {"--", 6}}},
                             {"merges", {"a b", "a -", "- b", "- -"}}}}};
    return afm::Tokenizer::from_json(tokenizer_json(patch), "t.json").encode("a--b", false);
  };
  using V = std::vector<int32_t>;
  EXPECT_EQ(split_ids("Isolated", false), (V{0, 3, 3, 1}));
  EXPECT_EQ(split_ids("Removed", false), (V{0, 1}));
  EXPECT_EQ(split_ids("Contiguous", false), (V{0, 6, 1}));
  EXPECT_EQ(split_ids("MergedWithPrevious", false), (V{4, 3, 1}));
  EXPECT_EQ(split_ids("MergedWithNext", false), (V{0, 3, 5}));
  EXPECT_EQ(split_ids("Removed", true), (V{3, 3}));
}

TEST(TokenizerConfigs, AddedTokenStripAndSingleWord) {
  json added = json::array({
      {{"id", 3}, {"content", "<x>"}, {"special", true}, {"lstrip", true}, {"rstrip", true},
       {"single_word", false}, {"normalized", false}},
      {{"id", 4}, {"content", "ab"}, {"special", false}, {"lstrip", false}, {"rstrip", false},
       {"single_word", true}, {"normalized", true}},
  });
  json patch = {{"added_tokens", added},
                {"model", {{"vocab", {{"a", 0}, {"b", 1}, {"Ġ", 2}}}, {"merges", json::array()}}}};
  auto tok = afm::Tokenizer::from_json(tokenizer_json(patch), "t.json");
  using V = std::vector<int32_t>;
  EXPECT_EQ(tok.encode("a  <x>  b", false), (V{0, 3, 1}));  // the spaces go with <x>
  EXPECT_EQ(tok.encode("ab", false), (V{4}));
  EXPECT_EQ(tok.encode("aab", false), (V{0, 0, 1}));  // not a single word
  EXPECT_EQ(tok.encode("a ab", false), (V{0, 2, 4}));
  EXPECT_EQ(tok.decode(V{0, 3, 4}, false), "a<x>ab");
  EXPECT_EQ(tok.decode(V{0, 3, 4}, true), "aab");
}

TEST(TokenizerConfigs, ByteFallbackAndUnk) {
  json vocab = {{"a", 0}, {"<unk>", 1}, {"<0xC3>", 2}, {"<0xA9>", 3}};
  json no_pre = {{"pre_tokenizer", nullptr}};
  using V = std::vector<int32_t>;
  json patch = no_pre;
  patch["model"] = {{"vocab", vocab}, {"merges", json::array()}, {"byte_fallback", true}};
  EXPECT_EQ(afm::Tokenizer::from_json(tokenizer_json(patch), "t.json").encode("aé", false), (V{0, 2, 3}));
  patch["model"] = {{"vocab", vocab}, {"merges", json::array()}, {"unk_token", "<unk>"}, {"fuse_unk", true}};
  EXPECT_EQ(afm::Tokenizer::from_json(tokenizer_json(patch), "t.json").encode("aüüa", false), (V{0, 1, 0}));
  patch["model"]["fuse_unk"] = false;
  EXPECT_EQ(afm::Tokenizer::from_json(tokenizer_json(patch), "t.json").encode("aüüa", false), (V{0, 1, 1, 0}));
  patch["model"] = {{"vocab", vocab}, {"merges", json::array()}};
  EXPECT_EQ(afm::Tokenizer::from_json(tokenizer_json(patch), "t.json").encode("aüa", false), (V{0, 0}));
}

// HF's regexes know Unicode 16.0, Debian 12's PCRE2 only 14.0. A Nag Mundari letter (Unicode 15)
// and a Garay digit (Unicode 16) must still be a letter and a digit, in the split regex and for
// single_word, and U+180E, a space to PCRE2's \s, must not be one. The ids are tokenizers 0.23.3's.
TEST(TokenizerConfigs, CharactersNewerThanPcre2AreClassifiedAsInHf) {
  const std::string letter = "\U0001E4D0", digit = "\U00010D40", mvs = "\u180E";
  json model = {{"vocab", {{"a", 0}, {letter, 1}, {"b", 2}, {"a" + letter, 3}, {"a" + letter + "b", 4}, {"1", 5},
                           {digit, 6}, {"1" + digit, 7}, {mvs, 8}, {"a" + mvs, 9}, {"a" + mvs + "b", 10}}},
                {"merges", {"a " + letter, "a" + letter + " b", "1 " + digit, "a " + mvs, "a" + mvs + " b"}}};
  auto split = [&](const char* kind, const std::string& pattern, const char* behavior) {
    json patch = {{"model", model},
                  {"pre_tokenizer", {{"type", "Split"}, {"pattern", {{kind, pattern}}}, {"behavior", behavior}}}};
    return afm::Tokenizer::from_json(tokenizer_json(patch), "t.json");
  };
  using V = std::vector<int32_t>;
  EXPECT_EQ(split("Regex", "\\p{L}+", "Isolated").encode("a" + letter + "b", false), (V{4}));
  EXPECT_EQ(split("Regex", "\\p{L}+", "Removed").encode("a" + letter + "b", false), (V{}));
  EXPECT_EQ(split("Regex", "\\p{N}+", "Isolated").encode("1" + digit, false), (V{7}));
  EXPECT_EQ(split("Regex", "\\s+", "Removed").encode("a" + mvs + "b", false), (V{10}));
  // A String pattern is matched as it is: U+10000, the letter's stand-in, does not match the letter.
  EXPECT_EQ(split("String", "\U00010000", "Removed").encode("a" + letter + "b", false), (V{4}));

  json added = json::array({{{"id", 11}, {"content", "ab"}, {"special", false}, {"lstrip", false},
                             {"rstrip", false}, {"single_word", true}, {"normalized", false}}});
  json patch = {{"model", model}, {"pre_tokenizer", nullptr}, {"added_tokens", added}};
  auto tok = afm::Tokenizer::from_json(tokenizer_json(patch), "t.json");
  EXPECT_EQ(tok.encode(letter + "ab", false), (V{1, 0, 2}));
  EXPECT_EQ(tok.encode("ab" + letter, false), (V{0, 2, 1}));
  EXPECT_EQ(tok.encode(digit + "ab", false), (V{6, 0, 2}));
  EXPECT_EQ(tok.encode("\u2400ab", false), (V{11}));  // a symbol is no word character
}

// Its speed is not asserted here (a timed unit test fails on a busy machine or a sanitizer build).
TEST(Tokenizer, LoadsLlama3) {
  afm::Tokenizer tok = afm::Tokenizer::load(fixture("tokenizer-llama3/tokenizer.json"));
  EXPECT_EQ(tok.vocab_size(), 128256);
  EXPECT_EQ(tok.decode(tok.encode("Hello, world!", false), false), "Hello, world!");
}

}  // namespace

// GPT-2's alphabet as byte-level vocabularies spell tokens: space is Ġ (U+0120), newline Ċ
// (U+010A), printable Latin-1 stands for itself, anything else is outside it.
TEST(ByteLevelAlphabet, SpellingAndMembership) {
  EXPECT_EQ(afm::byte_level_spelling(" \n"), "\u0120\u010A");
  EXPECT_EQ(afm::byte_level_spelling("\xC3\xA9"), "\u00C3\u00A9");  // é's two UTF-8 bytes
  EXPECT_TRUE(afm::is_byte_level_spelled("\u0120hello"));
  EXPECT_TRUE(afm::is_byte_level_spelled("\u00E9"));
  EXPECT_FALSE(afm::is_byte_level_spelled(" hello"));
  EXPECT_FALSE(afm::is_byte_level_spelled("\u4E16"));
  EXPECT_FALSE(afm::is_byte_level_spelled("\xFF"));
}
