// Differential test: afm's tokenizer against the npm @huggingface/tokenizers package (0.2.0, a JS
// port of HF tokenizers, pinned in tests/tokenizer_diff/package-lock.json) on both whole corpora
// and a few thousand seeded random Unicode strings, for both fixture tokenizers. Ids must agree.
//
// Needs node and `npm ci --prefix tests/tokenizer_diff` (no network once installed).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <unistd.h>

#include "tokenizer.h"

namespace {

using nlohmann::json;
const std::string kRoot = AFM_SOURCE_DIR;
const std::string kDiffDir = kRoot + "/tests/tokenizer_diff";

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Paragraphs, the unit a model sees; also small enough for the JS side to stay fast.
void add_paragraphs(const std::string& path, std::vector<std::string>& texts) {
  std::string text = read_file(path);
  ASSERT_GT(text.size(), 1000000u) << path;
  for (size_t start = 0; start < text.size();) {
    size_t end = std::min(text.find("\n\n", start), text.size());
    texts.push_back(text.substr(start, end - start));
    start = end + 2;
  }
}

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | cp >> 6), out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | cp >> 12), out += char(0x80 | (cp >> 6 & 0x3F)), out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | cp >> 18), out += char(0x80 | (cp >> 12 & 0x3F));
    out += char(0x80 | (cp >> 6 & 0x3F)), out += char(0x80 | (cp & 0x3F));
  }
}

// Random strings built from fragments that exercise the split regex and the merges. Characters
// whose class differs between JS regexes and HF's Oniguruma (U+0085 and U+FEFF for \s) or that
// are newer than the Unicode 14 tables of PCRE2 are left out: they test the reference, not afm.
std::string random_text(std::mt19937& rng) {
  static const std::vector<std::string> words = {
      "the", "The", "THE", "and", "Elizabeth", "Darcy", "hello", "world", "a", "I", "x", "naïve",
      "café", "Ångström", "Grüße", "straße", "Привет", "мир", "γειά", "שלום", "مرحبا", "हिन्दी",
      "日本語", "中文", "한국어", "テキスト", "ไทย", "e\u0301", "n\u0303o", "ǅ", "ﬁ", "Ⅻ", "½", "²"};
  static const std::vector<std::string> contractions = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
                                                        "'S", "'T", "'RE", "'VE", "'M", "'LL", "'D", "'"};
  static const std::vector<std::string> specials = {
      "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|eot_id|>",
      "<|reserved_special_token_7|>", "<|start_header_id|>", "<|im_", "|>", "<|", "<|not_special|>"};
  static const std::vector<std::string> spaces = {" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n",
                                                  "\n ", "\u00A0", "\u2009", "\u3000", "\u200B", "\u2028", "\v"};
  static const std::vector<std::string> symbols = {".", ",", "!", "?", "...", "--", "—", "“", "”", "(", ")",
                                                   "[", "]", "@", "#", "$", "€", "%", "&", "*", "/", "\\",
                                                   "∑", "√", "≤", "π", "©", "™", "_", "~", "`", "\"", "'"};
  static const std::vector<std::string> emoji = {"😀", "🎉", "👍🏽", "👨\u200D👩\u200D👧\u200D👦", "🇫🇷", "🇯🇵",
                                                 "❤️", "🏳️\u200D🌈", "🧑\u200D💻", "\u200D", "\uFE0F"};
  auto pick = [&](const std::vector<std::string>& v) { return v[rng() % v.size()]; };
  auto in_range = [&](uint32_t lo, uint32_t hi) { return lo + rng() % (hi - lo + 1); };

  std::string text;
  int fragments = 1 + int(rng() % 24);
  for (int i = 0; i < fragments; i++) {
    switch (rng() % 12) {
      case 0: case 1: case 2: text += pick(words); break;
      case 3: text += pick(contractions); break;
      case 4: text += pick(spaces); break;
      case 5: text += pick(symbols); break;
      case 6: for (int n = 1 + int(rng() % 7); n > 0; n--) text += char('0' + rng() % 10); break;
      case 7: text += pick(emoji); break;
      case 8: if (rng() % 4 == 0) text += pick(specials); else text += ' '; break;
      case 9:  // random characters from long-assigned blocks
        for (int n = 1 + int(rng() % 4); n > 0; n--) {
          static const uint32_t blocks[][2] = {{0x20, 0x7E},     {0xA1, 0x17F},    {0x391, 0x3C9},
                                               {0x410, 0x44F},   {0x5D0, 0x5EA},   {0x627, 0x64A},
                                               {0x905, 0x939},   {0x3041, 0x3096}, {0x4E00, 0x9FA5},
                                               {0xAC00, 0xD7A3}, {0x1F600, 0x1F64F}, {0x1D400, 0x1D433}};
          const auto& b = blocks[rng() % std::size(blocks)];
          append_utf8(in_range(b[0], b[1]), text);
        }
        break;
      case 10: text += std::string(1 + rng() % 12, " \n\ta-"[rng() % 5]); break;  // runs
      default: text += ' ' + pick(words); break;
    }
  }
  return text;
}

struct NodeRun {
  std::string name, dir, input, output, errors;
  FILE* pipe = nullptr;
};

std::string escaped(const std::string& text) { return json(text).dump().substr(0, 300); }

std::string ids_string(const std::vector<int32_t>& ids) {
  std::string s = json(ids).dump();
  return s.size() > 300 ? s.substr(0, 300) + "..." : s;
}

TEST(TokenizerDiff, MatchesHuggingFaceJsOnCorporaAndRandomText) {
  ASSERT_TRUE(std::filesystem::exists(kDiffDir + "/node_modules/@huggingface/tokenizers/package.json"))
      << "the reference package is not installed: run `npm ci --prefix tests/tokenizer_diff`";
  ASSERT_EQ(std::system("node --version > /dev/null 2>&1"), 0) << "node (20 or later) is not on PATH";

  std::vector<std::string> texts;
  add_paragraphs(kRoot + "/tests/fixtures/corpus/austen.txt", texts);
  add_paragraphs(kRoot + "/tests/fixtures/corpus/kjv.txt", texts);
  size_t corpus_texts = texts.size();
  std::mt19937 rng(20240611);
  for (int i = 0; i < 4000; i++) texts.push_back(random_text(rng));

  std::string tmp = testing::TempDir() + "afm_tokenizer_diff_" + std::to_string(::getpid());
  std::filesystem::create_directories(tmp);
  std::ofstream(tmp + "/texts.json") << json(texts).dump();

  // Both tokenizers at once: one node process each, on the machine's two cores.
  std::vector<NodeRun> runs;
  for (const char* name : {"tokenizer-austen-4k", "tokenizer-llama3"}) {
    NodeRun r{name, kRoot + "/tests/fixtures/" + name, tmp + "/texts.json",
              tmp + "/" + name + ".ids.json", tmp + "/" + name + ".err"};
    std::string command = "node '" + kDiffDir + "/hf_tokenize.mjs' encode '" + r.dir + "' '" + r.input +
                          "' '" + r.output + "' 2> '" + r.errors + "'";
    r.pipe = popen(command.c_str(), "r");
    ASSERT_NE(r.pipe, nullptr) << command;
    runs.push_back(r);
  }

  for (NodeRun& r : runs) {
    afm::Tokenizer tok = afm::Tokenizer::load(r.dir + "/tokenizer.json");
    std::vector<std::vector<int32_t>> ours;
    for (const std::string& text : texts) ours.push_back(tok.encode(text, false));

    int status = pclose(r.pipe);
    ASSERT_EQ(status, 0) << r.name << ": node failed:\n" << read_file(r.errors);
    json theirs = json::parse(read_file(r.output));
    ASSERT_EQ(theirs.size(), texts.size());

    size_t mismatches = 0, tokens = 0;
    for (size_t i = 0; i < texts.size(); i++) {
      tokens += ours[i].size();
      std::vector<int32_t> expected = theirs[i].get<std::vector<int32_t>>();
      if (ours[i] == expected) continue;
      if (++mismatches <= 5)
        ADD_FAILURE() << r.name << (i < corpus_texts ? " corpus paragraph " : " random text ") << i << ": "
                      << escaped(texts[i]) << "\n  afm: " << ids_string(ours[i])
                      << "\n  HF:  " << ids_string(expected);
    }
    EXPECT_EQ(mismatches, 0u) << r.name << ": " << mismatches << " of " << texts.size() << " texts differ";
    std::printf("%s: %zu texts (%zu corpus paragraphs), %zu tokens, %zu mismatches\n", r.name.c_str(),
                texts.size(), corpus_texts, tokens, mismatches);

    // Byte-level BPE loses nothing: decoding gives the text back.
    for (size_t i = 0; i < texts.size(); i++)
      if (tok.decode(ours[i], false) != texts[i]) {
        ADD_FAILURE() << r.name << ": decode(encode(text)) != text for " << escaped(texts[i]);
        break;
      }
  }
  std::filesystem::remove_all(tmp);
}

}  // namespace
