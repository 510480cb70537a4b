// Differential test: afm's tokenizer against HF `tokenizers` (the Rust library transformers uses,
// pinned in requirements.txt), run as tests/oracles/hf_tokenize.py in one process per tokenizer.
// Each case encodes the corpora (paragraph by paragraph, and their first 256 KiB as one text), every scalar value of the
// planes in use and a few thousand seeded random strings, with and without special tokens; ids
// and decoded text (skipping special tokens or not) must be byte-equal.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "model_files.h"
#include "support/subprocess.h"
#include "tokenizer.h"

namespace {

using nlohmann::json;
const std::string kRoot = AFM_SOURCE_DIR;

// One model's tokenizer as afm builds it, and the tokenizer.json HF builds the same one from.
// Paths are relative to the source root. SmolLM2's is built from its GGUF's metadata, on both
// sides: afm's by load_model_tokenizer, HF's by transformers (saved in its reference).
struct Case {
  const char* name;
  afm::Tokenizer (*load)(const std::string& path);  // how afm loads afm_path
  const char* afm_path;
  const char* hf_tokenizer_json;  // what the oracle loads; may be gzipped
};

const Case kCases[] = {
    {"Austen4k", afm::Tokenizer::load, "tests/fixtures/tokenizer-austen-4k/tokenizer.json",
     "tests/fixtures/tokenizer-austen-4k/tokenizer.json"},
    {"Llama3", afm::Tokenizer::load, "tests/fixtures/tokenizer-llama3/tokenizer.json",
     "tests/fixtures/tokenizer-llama3/tokenizer.json"},
    {"SmolLM2Gguf", afm::load_model_tokenizer, ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf",
     "tests/fixtures/smollm2-reference/tokenizer.json.gz"},
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
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

struct Text {
  std::string label;  // where it comes from, for failure messages
  std::string text;
};

void add_corpus(const std::string& name, std::vector<Text>& texts) {
  const std::string text = read_file(kRoot + "/tests/fixtures/corpus/" + name);
  ASSERT_GT(text.size(), 1000000u) << name;
  size_t paragraph = 0;
  for (size_t start = 0; start < text.size(); paragraph++) {
    size_t end = std::min(text.find("\n\n", start), text.size());
    texts.push_back({name + " paragraph " + std::to_string(paragraph), text.substr(start, end - start)});
    start = end + 2;
  }
  // Across paragraph breaks too, on a stretch long enough to hold hundreds of them: the whole corpus
  // would double the oracle's work for the same boundaries.
  size_t stretch = std::min<size_t>(text.size(), 256 << 10);
  while (stretch < text.size() && (static_cast<unsigned char>(text[stretch]) & 0xC0) == 0x80) stretch++;
  texts.push_back({name + " first 256 KiB", text.substr(0, stretch)});
}

// Every scalar value of the planes that have assigned characters (0 to 3 and 14), 256 consecutive
// ones per string, so that each character meets the split regex's classes (\p{L}, \p{N}, \s) and
// the byte-level alphabet at least once. Planes 4 to 13 (unassigned) and 15 and 16 (private use)
// are left to the random texts.
void add_every_code_point(std::vector<Text>& texts) {
  for (uint32_t plane : {0, 1, 2, 3, 14}) {
    for (uint32_t first = plane << 16; first < (plane + 1) << 16; first += 256) {
      if (first >= 0xD800 && first < 0xE000) continue;  // surrogates are not characters
      char label[48];
      std::snprintf(label, sizeof(label), "U+%04X to U+%04X", first, first + 255);
      Text t{label, ""};
      for (uint32_t cp = first; cp < first + 256; cp++) append_utf8(cp, t.text);
      texts.push_back(std::move(t));
    }
  }
}

// Random text made of fragments that each aim at one part of the pipeline. `specials` holds the
// tokenizer's special tokens, to glue to words, cut in pieces and nest.
class RandomText {
 public:
  RandomText(uint32_t seed, std::vector<std::string> specials) : rng_(seed), specials_(std::move(specials)) {
    for (const char* s : {"<|begin_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
                          "<|start_header_id|>", "<|end_header_id|>", "<|endoftext|>", "<s>", "</s>"})
      specials_.push_back(s);
    corpus_ = read_file(kRoot + "/tests/fixtures/corpus/austen.txt");
  }

  std::string next() {
    std::string text;
    for (int n = 1 + int(rng_() % 24); n > 0; n--) {
      fragment(text);
      if (rng_() % 2 == 0) text += pick(std::vector<std::string>{" ", " ", "\n", ""});
    }
    return text;
  }

 private:
  void fragment(std::string& out) {
    switch (rng_() % 14) {
      case 0: case 1: out += pick(kWords); break;
      case 2: out += ' ' + pick(kWords); break;
      case 3: script_run(out); break;
      case 4: for (int n = 1 + int(rng_() % 4); n > 0; n--) append_utf8(any_scalar(), out); break;
      case 5: emoji(out); break;
      case 6: combining(out); break;
      case 7: whitespace(out); break;
      case 8: digits(out); break;
      case 9: out += pick(kWords) + pick(kApostrophes) + cased(pick(kContractions)); break;
      case 10: for (int n = 1 + int(rng_() % 5); n > 0; n--) out += pick(kPunctuation); break;
      case 11: case 12: special_token(out); break;
      default: corpus_slice(out); break;
    }
  }

  template <class T>
  const T& pick(const std::vector<T>& v) { return v[rng_() % v.size()]; }
  uint32_t in_range(uint32_t lo, uint32_t hi) { return lo + rng_() % (hi - lo + 1); }

  // Characters of one script's block (or a symbols block), including the scripts Unicode added
  // after PCRE2's tables were made.
  void script_run(std::string& out) {
    const auto& [lo, hi] = pick(kBlocks);
    for (int n = 1 + int(rng_() % 8); n > 0; n--) append_utf8(in_range(lo, hi), out);
  }

  // Any scalar value of the planes in use (assigned or not), the private-use planes included.
  uint32_t any_scalar() {
    static const std::vector<std::pair<uint32_t, uint32_t>> planes = {
        {0, 0xD7FF}, {0xE000, 0xFFFF}, {0x10000, 0x1FFFF}, {0x20000, 0x3FFFF}, {0xE0000, 0xE01EF}, {0xF0000, 0x10FFFF}};
    const auto& [lo, hi] = pick(planes);
    return in_range(lo, hi);
  }

  void emoji(std::string& out) {
    switch (rng_() % 5) {
      case 0:  // a person with a skin tone, maybe in a ZWJ sequence
        append_utf8(in_range(0x1F466, 0x1F469), out);
        if (rng_() % 2) append_utf8(in_range(0x1F3FB, 0x1F3FF), out);
        for (int n = int(rng_() % 3); n > 0; n--) out += "\u200D", append_utf8(in_range(0x1F466, 0x1F469), out);
        break;
      case 1:  // a flag: two regional indicators (a real pair or not), or a tag sequence
        if (rng_() % 3 == 0) {
          out += "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F";
        } else {
          append_utf8(in_range(0x1F1E6, 0x1F1FF), out);
          append_utf8(in_range(0x1F1E6, 0x1F1FF), out);
        }
        break;
      case 2: out += pick(std::vector<std::string>{"1\uFE0F\u20E3", "#\uFE0F\u20E3", "\u2764\uFE0F", "\u263A", "\uFE0F",
                                                   "\u200D", "\U0001F3F3\uFE0F\u200D\U0001F308", "\U0001F9D1\u200D\U0001F4BB"});
        break;
      default: append_utf8(in_range(0x1F300, 0x1FAFF), out); break;  // Unicode 15 and 16 emoji too
    }
  }

  void combining(std::string& out) {
    static const std::vector<std::pair<uint32_t, uint32_t>> marks = {
        {0x300, 0x36F}, {0x483, 0x489}, {0x591, 0x5BD}, {0x64B, 0x65F}, {0x93A, 0x94F},
        {0x1AB0, 0x1ACE}, {0x1DC0, 0x1DFF}, {0x20D0, 0x20F0}, {0xFE20, 0xFE2F}, {0x1E000, 0x1E02A}};
    if (rng_() % 4) out += pick(kWords);  // otherwise the marks start the fragment
    for (int n = 1 + int(rng_() % 4); n > 0; n--) {
      const auto& [lo, hi] = pick(marks);
      append_utf8(in_range(lo, hi), out);
    }
  }

  void whitespace(std::string& out) {
    static const std::vector<std::string> spaces = {
        " ", " ", "\t", "\n", "\n", "\r", "\r\n", "\v", "\f", "\u0085", "\u00A0", "\u1680", "\u2000",
        "\u2007", "\u2009", "\u200A", "\u2028", "\u2029", "\u202F", "\u205F", "\u3000", "\u180E",
        "\u200B", "\u200C", "\u200D", "\u2060", "\uFEFF", std::string(1, '\0'), "\x1F"};
    for (int n = 1 + int(rng_() % 8); n > 0; n--) out += pick(spaces);
  }

  void digits(std::string& out) {
    // The zero of each run of ten decimal digits, ASCII first; Unicode 16's outlined digits last.
    static const std::vector<uint32_t> zeros = {
        '0', '0', 0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66,
        0xDE6, 0xE50, 0xED0, 0xF20, 0x1040, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1B50, 0xA8D0, 0xA900,
        0xFF10, 0x104A0, 0x11066, 0x16A60, 0x1D7CE, 0x1E950, 0x1FBF0, 0x1E4F0, 0x16D70, 0x1CCF0};
    uint32_t zero = pick(zeros);
    for (int n = 1 + int(rng_() % (rng_() % 4 ? 5 : 40)); n > 0; n--) {
      if (rng_() % 8 == 0) zero = pick(zeros);  // mixed scripts' digits in one number
      append_utf8(zero + rng_() % 10, out);
      if (rng_() % 10 == 0) out += pick(std::vector<std::string>{".", ",", " ", "_", "\u00B2", "\u00BD", "\u2167"});
    }
  }

  std::string cased(std::string s) {
    for (char& c : s)
      if (rng_() % 3 == 0) c = char(std::toupper(static_cast<unsigned char>(c)));
    if (s == "s" && rng_() % 4 == 0) return "\u017F";  // long s: case-folds to s, as (?i:'s) knows
    return s;
  }

  // Whole special tokens (the tokenizer's and some common ones), glued to words or each other,
  // and pieces of them.
  void special_token(std::string& out) {
    const std::string& token = pick(specials_);
    switch (rng_() % 6) {
      case 0: out += pick(kWords) + token + pick(kWords); break;
      case 1: out += token.substr(0, 1 + rng_() % token.size()); break;  // a prefix
      case 2: out += token.substr(rng_() % token.size()); break;         // a suffix
      case 3:  // one token inside another
        {
          size_t cut = 1 + rng_() % token.size();
          out += token.substr(0, cut) + pick(specials_) + token.substr(cut);
        }
        break;
      default: out += token; break;
    }
  }

  void corpus_slice(std::string& out) {
    size_t start = rng_() % corpus_.size(), len = 1 + rng_() % 200;
    while (start > 0 && (static_cast<unsigned char>(corpus_[start]) & 0xC0) == 0x80) start--;
    size_t end = std::min(start + len, corpus_.size());
    while (end < corpus_.size() && (static_cast<unsigned char>(corpus_[end]) & 0xC0) == 0x80) end++;
    out += corpus_.substr(start, end - start);
  }

  static inline const std::vector<std::string> kWords = {
      "the", "The", "THE", "and", "Elizabeth", "Darcy", "hello", "world", "a", "I", "x", "OK", "don", "naïve",
      "café", "Ångström", "Grüße", "straße", "ǅemal", "ﬁne", "İstanbul", "Ελλάδα", "γειά", "Привет", "мир",
      "Բարեւ", "שָׁלוֹם", "مرحبا", "السلام", "ܫܠܡܐ", "हिन्दी", "नमस्ते", "বাংলা", "ਪੰਜਾਬੀ", "ગુજરાતી", "ଓଡ଼ିଆ", "தமிழ்",
      "తెలుగు", "ಕನ್ನಡ", "മലയാളം", "සිංහල", "ไทย", "สวัสดี", "ລາວ", "བོད་ཡིག", "မြန်မာ", "ខ្មែរ", "ქართული",
      "한국어", "안녕하세요", "ひらがな", "カタカナ", "ﾊﾝｶｸ", "日本語", "中文", "繁體字", "ግዕዝ", "ᏣᎳᎩ", "ᠮᠣᠩᠭᠣᠯ",
      "ᐃᓄᒃᑎᑐᑦ", "ᚠᚢᚦ", "ⲕⲏⲙⲉ", "ⴰⵎⴰⵣⵉⵖ", "ꆈꌠ", "𐌲𐌿𐍄𐌹𐍃𐌺", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝", "Ⅻ", "½", "x²", "e\u0301",
      "n\u0303o", "ＦＵＬＬ", "𞤀𞤣𞤤𞤢𞤥", "𖽀", "𑀩𑀼𑀤𑁆𑀥", "𓀀𓁐", "𑼄𑼱", "𞓐𞓕", "𐵐𐵑"};
  static inline const std::vector<std::string> kApostrophes = {"'", "'", "'", "\u2019", "`"};
  static inline const std::vector<std::string> kContractions = {"s", "t", "re", "ve", "m", "ll", "d", "", "x", "st"};
  static inline const std::vector<std::string> kPunctuation = {
      ".", ",", "!", "?", "...", "--", "-", "—", "–", "“", "”", "‘", "’", "«", "»", "(", ")", "[", "]", "{", "}",
      "@", "#", "$", "€", "£", "¥", "%", "&", "*", "/", "\\", "|", "^", "~", "`", "\"", "'", ";", ":", "<", ">",
      "=", "+", "_", "∑", "√", "≤", "π", "©", "™", "§", "¶", "•", "·", "、", "。", "「", "」", "！", "？", "؟", "।", "॥"};
  // The blocks of (nearly) every script, some symbols, and scripts newer than Unicode 14.
  static inline const std::vector<std::pair<uint32_t, uint32_t>> kBlocks = {
      {0x41, 0x24F},       {0x250, 0x2FF},       {0x370, 0x3FF},       {0x400, 0x52F},     {0x531, 0x58A},
      {0x591, 0x5F4},      {0x600, 0x6FF},       {0x700, 0x74F},       {0x780, 0x7B1},     {0x7C0, 0x7FF},
      {0x800, 0x89F},      {0x8A0, 0x8FF},       {0x900, 0x97F},       {0x980, 0x9FE},     {0xA00, 0xA76},
      {0xA81, 0xAFF},      {0xB01, 0xB77},       {0xB82, 0xBFA},       {0xC00, 0xC7F},     {0xC80, 0xCF3},
      {0xD00, 0xD7F},      {0xD81, 0xDF4},       {0xE01, 0xE5B},       {0xE81, 0xEDF},     {0xF00, 0xFDA},
      {0x1000, 0x109F},    {0x10A0, 0x10FF},     {0x1100, 0x11FF},     {0x1200, 0x139F},   {0x13A0, 0x13FD},
      {0x1400, 0x167F},    {0x1680, 0x169C},     {0x16A0, 0x16F8},     {0x1700, 0x177F},   {0x1780, 0x17F9},
      {0x1800, 0x18AA},    {0x1900, 0x19DF},     {0x1A00, 0x1AAD},     {0x1B00, 0x1B7F},   {0x1B80, 0x1BFF},
      {0x1C00, 0x1C7F},    {0x1C80, 0x1CBF},     {0x1D00, 0x1DFF},     {0x1E00, 0x1FFE},   {0x2000, 0x206F},
      {0x2070, 0x20C0},    {0x2100, 0x218B},     {0x2190, 0x23FF},     {0x2400, 0x24FF},   {0x2500, 0x27FF},
      {0x2800, 0x28FF},    {0x2900, 0x2BFF},     {0x2C00, 0x2C5F},     {0x2C60, 0x2D2D},   {0x2D30, 0x2DDF},
      {0x2E00, 0x2E5D},    {0x2E80, 0x2FFF},     {0x3000, 0x303F},     {0x3041, 0x30FF},   {0x3105, 0x31FF},
      {0x3200, 0x33FF},    {0x3400, 0x4DBF},     {0x4DC0, 0x4DFF},     {0x4E00, 0x9FFF},   {0xA000, 0xA4CF},
      {0xA4D0, 0xA6FF},    {0xA700, 0xA7FF},     {0xA800, 0xA97F},     {0xA980, 0xAB2F},   {0xAB30, 0xABFF},
      {0xAC00, 0xD7A3},    {0xD7B0, 0xD7FB},     {0xE000, 0xF8FF},     {0xF900, 0xFAFF},   {0xFB00, 0xFDFF},
      {0xFE00, 0xFE6F},    {0xFE70, 0xFEFF},     {0xFF00, 0xFFEF},     {0xFFF0, 0xFFFF},   {0x10000, 0x1013F},
      {0x10280, 0x1037F},  {0x10400, 0x104FF},   {0x10500, 0x105FF},   {0x10800, 0x10AFF}, {0x10B00, 0x10DFF},
      {0x10E60, 0x10EFF},  {0x11000, 0x1124F},   {0x11280, 0x113FF},   {0x11400, 0x116FF}, {0x11700, 0x11AFF},
      {0x11B00, 0x11FFF},  {0x12000, 0x1254F},   {0x13000, 0x1345F},   {0x13460, 0x143FA}, {0x16100, 0x16139},
      {0x16800, 0x16AFF},  {0x16D40, 0x16D79},   {0x16F00, 0x16FFF},   {0x17000, 0x18CFF}, {0x1B000, 0x1B2FF},
      {0x1BC00, 0x1BCAF},  {0x1CC00, 0x1CEBF},   {0x1D000, 0x1D2FF},   {0x1D400, 0x1D7FF}, {0x1DF00, 0x1E08F},
      {0x1E100, 0x1E14F},  {0x1E290, 0x1E2FF},   {0x1E4D0, 0x1E5FF},   {0x1E800, 0x1E95F}, {0x1EC70, 0x1EEFF},
      {0x1F000, 0x1F2FF},  {0x1F300, 0x1FAFF},   {0x1FB00, 0x1FBF9},   {0x20000, 0x2A6DF}, {0x2B740, 0x2B81D},
      {0x2EBF0, 0x2EE5D},  {0x30000, 0x3134A},   {0x31350, 0x323AF},   {0xE0000, 0xE007F}, {0xE0100, 0xE01EF}};

  std::mt19937 rng_;
  std::vector<std::string> specials_;
  std::string corpus_;
};

// The texts ids are checked on: corpora, every scalar value, then kRandomTexts random ones, which
// use the special tokens of `tok`.
constexpr int kRandomTexts = 5000;

std::vector<Text> test_texts(const afm::Tokenizer& tok) {
  std::vector<Text> texts;
  add_corpus("austen.txt", texts);
  add_corpus("kjv.txt", texts);
  add_every_code_point(texts);
  std::vector<std::string> specials;
  for (int32_t id = 0; id < tok.vocab_size(); id++)
    if (tok.is_special(id)) specials.push_back(tok.token_text(id));
  RandomText random(20240611, specials);
  for (int i = 0; i < kRandomTexts; i++) texts.push_back({"random text " + std::to_string(i), random.next()});
  return texts;
}

std::string shown(const std::string& text) {
  std::string s = json(text).dump(-1, ' ', false, json::error_handler_t::replace);
  return s.size() > 400 ? s.substr(0, 400) + "... (" + std::to_string(text.size()) + " bytes)" : s;
}

// The first difference between two id sequences and a few ids around it.
std::string id_difference(const std::vector<int32_t>& afm, const std::vector<int32_t>& hf) {
  size_t i = std::mismatch(afm.begin(), afm.end(), hf.begin(), hf.end()).first - afm.begin();
  size_t from = i < 4 ? 0 : i - 4;
  auto window = [&](const std::vector<int32_t>& ids) {
    std::vector<int32_t> w(ids.begin() + std::min(from, ids.size()), ids.begin() + std::min(i + 8, ids.size()));
    return json(w).dump();
  };
  return "first difference at id " + std::to_string(i) + " of " + std::to_string(afm.size()) + " (afm) / " +
         std::to_string(hf.size()) + " (HF), ids from " + std::to_string(from) + ":\n  afm: " + window(afm) +
         "\n  HF:  " + window(hf);
}

// One case's texts and the oracle's run over them.
struct OracleRun {
  std::vector<Text> texts;
  std::string dir;  // holds texts.json and the oracle's hf.json
  std::future<afm::test::Result> result;
  ~OracleRun() {
    if (result.valid()) result.wait();  // a case that was filtered out or failed early
    std::filesystem::remove_all(dir);
  }
};

// The oracle runs of every case, all started on first use: they share the cores with each other
// and with afm's side of the first case, which keeps the whole test well under a minute.
std::map<std::string, OracleRun>& oracle_runs() {
  static std::map<std::string, OracleRun> runs = [] {
    std::map<std::string, OracleRun> started;
    for (const Case& c : kCases) {
      const std::string hf_json = kRoot + "/" + c.hf_tokenizer_json;
      OracleRun& run = started[c.name];
      run.texts = test_texts(c.load(kRoot + "/" + c.afm_path));
      run.dir = testing::TempDir() + "afm_tokenizer_diff_" + std::to_string(::getpid()) + "_" + c.name;
      std::filesystem::create_directories(run.dir);
      std::vector<std::string> strings;
      for (const Text& t : run.texts) strings.push_back(t.text);
      std::ofstream(run.dir + "/texts.json") << json(strings).dump();
      run.result = std::async(std::launch::async, afm::test::run_oracle,
                              "hf_tokenize.py encode '" + hf_json + "' '" + run.dir + "/texts.json' '" +
                                  run.dir + "/hf.json' 2>&1");
    }
    return started;
  }();
  return runs;
}

class TokenizerDiff : public testing::TestWithParam<Case> {};

TEST_P(TokenizerDiff, IdsAndTextEqualHuggingFace) {
  const Case& c = GetParam();
  OracleRun& run = oracle_runs().at(c.name);
  const std::vector<Text>& texts = run.texts;

  // afm's ids first, while the oracle works.
  const afm::Tokenizer tok = c.load(kRoot + "/" + c.afm_path);
  std::vector<std::vector<int32_t>> ids, ids_special;
  size_t tokens = 0;
  for (const Text& t : texts) {
    ids.push_back(tok.encode(t.text, false));
    ids_special.push_back(tok.encode(t.text, true));
    tokens += ids.back().size();
  }

  const afm::test::Result oracle = run.result.get();
  ASSERT_EQ(oracle.status, 0) << "tests/oracles/hf_tokenize.py failed:\n" << oracle.out;
  const json theirs = json::parse(read_file(run.dir + "/hf.json"));
  ASSERT_EQ(theirs.size(), texts.size());

  size_t mismatches = 0;
  auto report = [&](const Text& t, const std::string& what) {
    if (++mismatches <= 8) ADD_FAILURE() << c.name << ", " << t.label << ": " << shown(t.text) << "\n" << what;
  };
  for (size_t i = 0; i < texts.size(); i++) {
    const json& hf = theirs[i];
    const std::vector<int32_t> hf_ids = hf["ids"], hf_special = hf["ids_special"];
    if (ids[i] != hf_ids) report(texts[i], "ids differ, " + id_difference(ids[i], hf_ids));
    else if (ids_special[i] != hf_special)
      report(texts[i], "ids with special tokens differ, " + id_difference(ids_special[i], hf_special));
    // Decoding HF's ids tests decode on its own, even where the ids differ.
    for (bool skip : {false, true}) {
      const std::string& expected = hf[skip ? "decoded_skip" : "decoded"].get_ref<const std::string&>();
      const std::string decoded = tok.decode(hf_ids, skip);
      if (decoded != expected)
        report(texts[i], std::string("decode(skip_special_tokens=") + (skip ? "true" : "false") +
                             ") differs:\n  afm: " + shown(decoded) + "\n  HF:  " + shown(expected));
    }
  }
  EXPECT_EQ(mismatches, 0u) << c.name << ": " << mismatches << " mismatches in " << texts.size() << " texts";
  std::printf("%s: %zu texts, %zu tokens, %zu mismatches\n", c.name, texts.size(), tokens, mismatches);
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, TokenizerDiff, testing::ValuesIn(kCases),
                         [](const testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

}  // namespace
