// HF tokenizer.json, reimplemented. The encode pipeline mirrors HF `tokenizers`:
//   1. split the text on added tokens (literal, leftmost-longest), which become ids directly;
//   2. run each remaining segment through the pre-tokenizer steps (Split, ByteLevel) into pieces;
//   3. BPE-merge each piece (with a word cache), 4. wrap the result in the post-processor template.
// Decoding maps byte-level characters back to bytes and repairs UTF-8 like Rust's from_utf8_lossy.
#include "tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "error.h"

namespace afm {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// UTF-8

// Length of the well-formed prefix of the UTF-8 sequence that starts at p[0] (at most n bytes),
// and whether that prefix is a whole character. A byte that cannot start a character gives 0.
size_t utf8_prefix(const unsigned char* p, size_t n, bool* complete) {
  unsigned char b = p[0];
  *complete = b < 0x80;
  if (b < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte (Unicode table 3-7)
  if (b >= 0xC2 && b <= 0xDF) need = 2;
  else if (b == 0xE0) need = 3, lo = 0xA0;
  else if (b == 0xED) need = 3, hi = 0x9F;
  else if (b >= 0xE1 && b <= 0xEF) need = 3;
  else if (b == 0xF0) need = 4, lo = 0x90;
  else if (b == 0xF4) need = 4, hi = 0x8F;
  else if (b >= 0xF1 && b <= 0xF3) need = 4;
  else return 0;
  size_t k = 1;
  for (; k < need && k < n; k++) {
    unsigned char c = p[k];
    if (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF)) break;
  }
  *complete = k == need;
  return k;
}

bool is_valid_utf8(std::string_view s) {
  auto p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    if (p[i] < 0x80) {
      i++;
      continue;
    }
    bool complete;
    size_t len = utf8_prefix(p + i, s.size() - i, &complete);
    if (!complete) return false;
    i += len;
  }
  return true;
}

// Byte length of the valid character starting at s[i].
size_t char_len(std::string_view s, size_t i) {
  unsigned char b = s[i];
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

// Code point of the valid character at s[i].
uint32_t decode_char(std::string_view s, size_t i) {
  auto p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  switch (char_len(s, i)) {
    case 1: return p[0];
    case 2: return (p[0] & 0x1Fu) << 6 | (p[1] & 0x3Fu);
    case 3: return (p[0] & 0x0Fu) << 12 | (p[1] & 0x3Fu) << 6 | (p[2] & 0x3Fu);
    default: return (p[0] & 0x07u) << 18 | (p[1] & 0x3Fu) << 12 | (p[2] & 0x3Fu) << 6 | (p[3] & 0x3Fu);
  }
}

// Start of the valid character that ends at s[i - 1].
size_t prev_char_start(std::string_view s, size_t i) {
  do i--;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80);
  return i;
}

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | cp >> 6);
    out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | cp >> 12);
    out += char(0x80 | (cp >> 6 & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | cp >> 18);
    out += char(0x80 | (cp >> 12 & 0x3F));
    out += char(0x80 | (cp >> 6 & 0x3F));
    out += char(0x80 | (cp & 0x3F));
  }
}

// Unicode White_Space, which is what `\s` means in the Rust regexes HF uses for lstrip/rstrip.
bool is_unicode_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// ---------------------------------------------------------------------------------------------
// Unicode versions
//
// HF's regexes know Unicode 16.0 (Oniguruma for the Split and ByteLevel regexes, the Rust regex
// crate for single_word), Debian 12's PCRE2 10.42 knows Unicode 14.0. To PCRE2 the characters
// assigned since are unassigned (Cn): \p{L}+ would stop at a Kawi letter and \p{N} would miss
// Garay digits. So the regexes match a copy of the text in which each such character is replaced
// by a stand-in that PCRE2 knows, of the same general category (an ideograph for the new
// ideographs) and the same UTF-8 length: matches then fall at the same byte offsets as in the
// original. U+180E, a space to PCRE2's \s but not to Unicode's White_Space (Oniguruma's \s)
// since Unicode 6.3, stands in as U+200B, another format character; U+1171E changed from Mn to
// Mc. Made by comparing the two engines on each general category over every scalar value; with
// a newer PCRE2 the stand-ins are harmless. Only a regex that spelled one of these characters
// (or a stand-in) literally would see the difference; the patterns in use are classes only.

struct StandIn {
  uint32_t first, last, stand_in;
};
constexpr StandIn kStandIns[] = {
    {0x897, 0x897, 0x20D0}, {0xCF3, 0xCF3, 0x903}, {0xECE, 0xECE, 0x20D0}, {0x180E, 0x180E, 0x200B},
    {0x1B4E, 0x1B4F, 0x1B5A}, {0x1B7F, 0x1B7F, 0x1B5A}, {0x1C89, 0x1C89, 0x10A0},
    {0x1C8A, 0x1C8A, 0x2D00}, {0x2427, 0x2429, 0x2400}, {0x2FFC, 0x2FFF, 0x2400},
    {0x31E4, 0x31E5, 0x2400}, {0x31EF, 0x31EF, 0x2400}, {0xA7CB, 0xA7CC, 0x10A0},
    {0xA7CD, 0xA7CD, 0x2D00}, {0xA7DA, 0xA7DA, 0x10A0}, {0xA7DB, 0xA7DB, 0x2D00},
    {0xA7DC, 0xA7DC, 0x10A0}, {0x105C0, 0x105F3, 0x10000}, {0x10D40, 0x10D49, 0x104A0},
    {0x10D4A, 0x10D4D, 0x10000}, {0x10D4E, 0x10D4E, 0x16F93}, {0x10D4F, 0x10D4F, 0x10000},
    {0x10D50, 0x10D65, 0x10400}, {0x10D69, 0x10D6D, 0x101FD}, {0x10D6E, 0x10D6E, 0x10EAD},
    {0x10D6F, 0x10D6F, 0x16F93}, {0x10D70, 0x10D85, 0x10428}, {0x10D8E, 0x10D8F, 0x1D6C1},
    {0x10EC2, 0x10EC4, 0x10000}, {0x10EFC, 0x10EFF, 0x101FD}, {0x1123F, 0x11240, 0x10000},
    {0x11241, 0x11241, 0x101FD}, {0x11380, 0x11389, 0x10000}, {0x1138B, 0x1138B, 0x10000},
    {0x1138E, 0x1138E, 0x10000}, {0x11390, 0x113B5, 0x10000}, {0x113B7, 0x113B7, 0x10000},
    {0x113B8, 0x113BA, 0x11000}, {0x113BB, 0x113C0, 0x101FD}, {0x113C2, 0x113C2, 0x11000},
    {0x113C5, 0x113C5, 0x11000}, {0x113C7, 0x113CA, 0x11000}, {0x113CC, 0x113CD, 0x11000},
    {0x113CE, 0x113CE, 0x101FD}, {0x113CF, 0x113CF, 0x11000}, {0x113D0, 0x113D0, 0x101FD},
    {0x113D1, 0x113D1, 0x10000}, {0x113D2, 0x113D2, 0x101FD}, {0x113D3, 0x113D3, 0x10000},
    {0x113D4, 0x113D5, 0x10100}, {0x113D7, 0x113D8, 0x10100}, {0x113E1, 0x113E2, 0x101FD},
    {0x116D0, 0x116E3, 0x104A0}, {0x1171E, 0x1171E, 0x11000}, {0x11B00, 0x11B09, 0x10100},
    {0x11BC0, 0x11BE0, 0x10000}, {0x11BE1, 0x11BE1, 0x10100}, {0x11BF0, 0x11BF9, 0x104A0},
    {0x11F00, 0x11F01, 0x101FD}, {0x11F02, 0x11F02, 0x10000}, {0x11F03, 0x11F03, 0x11000},
    {0x11F04, 0x11F10, 0x10000}, {0x11F12, 0x11F33, 0x10000}, {0x11F34, 0x11F35, 0x11000},
    {0x11F36, 0x11F3A, 0x101FD}, {0x11F3E, 0x11F3F, 0x11000}, {0x11F40, 0x11F40, 0x101FD},
    {0x11F41, 0x11F41, 0x11000}, {0x11F42, 0x11F42, 0x101FD}, {0x11F43, 0x11F4F, 0x10100},
    {0x11F50, 0x11F59, 0x104A0}, {0x11F5A, 0x11F5A, 0x101FD}, {0x1342F, 0x1342F, 0x10000},
    {0x13439, 0x1343F, 0x1BCA0}, {0x13440, 0x13440, 0x101FD}, {0x13441, 0x13446, 0x10000},
    {0x13447, 0x13455, 0x101FD}, {0x13460, 0x143FA, 0x10000}, {0x16100, 0x1611D, 0x10000},
    {0x1611E, 0x16129, 0x101FD}, {0x1612A, 0x1612C, 0x11000}, {0x1612D, 0x1612F, 0x101FD},
    {0x16130, 0x16139, 0x104A0}, {0x16D40, 0x16D42, 0x16F93}, {0x16D43, 0x16D6A, 0x10000},
    {0x16D6B, 0x16D6C, 0x16F93}, {0x16D6D, 0x16D6F, 0x10100}, {0x16D70, 0x16D79, 0x104A0},
    {0x18CFF, 0x18CFF, 0x10000}, {0x1B132, 0x1B132, 0x10000}, {0x1B155, 0x1B155, 0x10000},
    {0x1CC00, 0x1CCEF, 0x1F300}, {0x1CCF0, 0x1CCF9, 0x104A0}, {0x1CD00, 0x1CEB3, 0x1F300},
    {0x1D2C0, 0x1D2D3, 0x10107}, {0x1DF25, 0x1DF2A, 0x10428}, {0x1E030, 0x1E06D, 0x16F93},
    {0x1E08F, 0x1E08F, 0x101FD}, {0x1E4D0, 0x1E4EA, 0x10000}, {0x1E4EB, 0x1E4EB, 0x16F93},
    {0x1E4EC, 0x1E4EF, 0x101FD}, {0x1E4F0, 0x1E4F9, 0x104A0}, {0x1E5D0, 0x1E5ED, 0x10000},
    {0x1E5EE, 0x1E5EF, 0x101FD}, {0x1E5F0, 0x1E5F0, 0x10000}, {0x1E5F1, 0x1E5FA, 0x104A0},
    {0x1E5FF, 0x1E5FF, 0x10100}, {0x1F6DC, 0x1F6DC, 0x1F300}, {0x1F774, 0x1F776, 0x1F300},
    {0x1F77B, 0x1F77F, 0x1F300}, {0x1F7D9, 0x1F7D9, 0x1F300}, {0x1F8B2, 0x1F8BB, 0x1F300},
    {0x1F8C0, 0x1F8C1, 0x1F300}, {0x1FA75, 0x1FA77, 0x1F300}, {0x1FA87, 0x1FA89, 0x1F300},
    {0x1FA8F, 0x1FA8F, 0x1F300}, {0x1FAAD, 0x1FAAF, 0x1F300}, {0x1FABB, 0x1FABF, 0x1F300},
    {0x1FAC6, 0x1FAC6, 0x1F300}, {0x1FACE, 0x1FACF, 0x1F300}, {0x1FADA, 0x1FADC, 0x1F300},
    {0x1FADF, 0x1FADF, 0x1F300}, {0x1FAE8, 0x1FAE9, 0x1F300}, {0x1FAF7, 0x1FAF8, 0x1F300},
    {0x1FBCB, 0x1FBEF, 0x1F300}, {0x2B739, 0x2B739, 0x20000}, {0x2EBF0, 0x2EE5D, 0x20000},
    {0x31350, 0x323AF, 0x20000},
};

// The character PCRE2 should see for cp.
uint32_t stand_in(uint32_t cp) {
  const StandIn* s = std::upper_bound(std::begin(kStandIns), std::end(kStandIns), cp,
                                      [](uint32_t c, const StandIn& e) { return c < e.first; });
  return s != std::begin(kStandIns) && cp <= s[-1].last ? s[-1].stand_in : cp;
}

// If text has a character with a stand-in, sets *out to text with the stand-ins and returns true.
bool with_stand_ins(std::string_view text, std::string* out) {
  bool copied = false;
  for (size_t i = 0; i < text.size(); i++) {
    if (static_cast<unsigned char>(text[i]) < 0xE0) continue;  // every stand-in is for 3 or 4 bytes
    uint32_t cp = decode_char(text, i), s = stand_in(cp);
    if (s != cp) {
      if (!copied) out->assign(text);
      copied = true;
      std::string utf8;
      append_utf8(s, utf8);
      out->replace(i, utf8.size(), utf8);
    }
    i += char_len(text, i) - 1;
  }
  return copied;
}

// ---------------------------------------------------------------------------------------------
// GPT-2's byte-level alphabet: every byte gets a printable character. Printable Latin-1 bytes map
// to themselves, the other 68 bytes to U+0100.. in byte order.

struct ByteLevelAlphabet {
  std::array<std::array<char, 2>, 256> utf8;  // UTF-8 of each byte's character
  std::array<uint8_t, 256> utf8_len;
  std::array<int16_t, 324> byte_of;  // code point -> byte, -1 for characters outside the alphabet

  ByteLevelAlphabet() {
    byte_of.fill(-1);
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; b++) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      uint32_t cp = printable ? b : next++;
      std::string s;
      append_utf8(cp, s);
      utf8_len[b] = uint8_t(s.size());
      std::copy(s.begin(), s.end(), utf8[b].begin());
      byte_of[cp] = int16_t(b);
    }
  }
};

const ByteLevelAlphabet& byte_level() {
  static const ByteLevelAlphabet alphabet;
  return alphabet;
}

// ---------------------------------------------------------------------------------------------
// Containers

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// The model vocabulary, both ways. token -> id is a flat open-addressing table of (hash, id):
// a lookup (three per merge while loading, one per character while merging) touches one slot and
// one token rather than a chain of heap nodes, which made loading Llama-3 twice as slow.
class Vocab {
 public:
  void assign(std::vector<std::pair<std::string, int32_t>>&& entries) {
    int32_t max_id = -1;
    for (const auto& entry : entries) max_id = std::max(max_id, entry.second);
    tokens_.assign(size_t(max_id + 1), std::string());
    present_.assign(size_t(max_id + 1), false);
    size_t size = 16;
    while (size < 2 * entries.size()) size *= 2;
    slots_.assign(size, Slot{});
    // A token listed twice keeps its last id, like HF's HashMap.
    for (auto& [token, id] : entries) {
      slots_[slot_index(token, hash(token))] = {hash(token), id};
      tokens_[id] = std::move(token);
      present_[id] = true;
    }
  }

  std::optional<int32_t> find(std::string_view token) const {
    if (slots_.empty()) return std::nullopt;
    const Slot& slot = slots_[slot_index(token, hash(token))];
    if (slot.id < 0) return std::nullopt;
    return slot.id;
  }

  bool has(int32_t id) const { return id >= 0 && size_t(id) < tokens_.size() && present_[id]; }
  const std::string& token(int32_t id) const { return tokens_[id]; }
  int32_t size() const { return int32_t(tokens_.size()); }  // one past the largest id

 private:
  struct Slot {
    uint32_t hash = 0;
    int32_t id = -1;
  };
  static uint32_t hash(std::string_view s) { return uint32_t(std::hash<std::string_view>{}(s)); }

  // The slot holding token, or the empty slot where it would go.
  size_t slot_index(std::string_view token, uint32_t h) const {
    size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& slot = slots_[i];
      if (slot.id < 0 || (slot.hash == h && tokens_[slot.id] == token)) return i;
    }
  }

  std::vector<std::string> tokens_;  // by id; empty where the vocabulary has a hole
  std::vector<bool> present_;
  std::vector<Slot> slots_;
};

// (left id, right id) -> (rank, merged id), open addressing: the merge loop's hottest lookup.
class MergeTable {
 public:
  struct Entry {
    uint32_t rank;
    int32_t id;
  };

  void reserve(size_t n) {
    size_t size = 16;
    while (size < n + n / 2) size *= 2;  // load factor 0.33 to 0.67
    shift_ = 64 - std::countr_zero(size);
    slots_.assign(size, Slot{});
  }

  // A pair listed twice keeps its last rank, as HF's HashMap insert does.
  void set(int32_t a, int32_t b, Entry e) { slots_[slot_index(key(a, b))] = {key(a, b), e}; }

  const Entry* find(int32_t a, int32_t b) const {
    if (slots_.empty()) return nullptr;
    const Slot& s = slots_[slot_index(key(a, b))];
    return s.key == kEmpty ? nullptr : &s.entry;
  }

 private:
  static constexpr uint64_t kEmpty = ~0ull;  // ids are non-negative int32, so never a real key
  struct Slot {
    uint64_t key = kEmpty;
    Entry entry{};
  };
  static uint64_t key(int32_t a, int32_t b) { return uint64_t(uint32_t(a)) << 32 | uint32_t(b); }

  // The slot holding k, or the empty slot where it would go.
  size_t slot_index(uint64_t k) const {
    size_t mask = slots_.size() - 1;
    size_t i = size_t((k * 0x9E3779B97F4A7C15ull) >> shift_);  // Fibonacci hashing: top bits
    while (slots_[i].key != kEmpty && slots_[i].key != k) i = (i + 1) & mask;
    return i;
  }

  std::vector<Slot> slots_;
  int shift_ = 0;
};

// ---------------------------------------------------------------------------------------------
// PCRE2

struct CodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct MatchDataDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};
using Regex = std::unique_ptr<pcre2_code, CodeDeleter>;
using MatchData = std::unique_ptr<pcre2_match_data, MatchDataDeleter>;

Regex compile_regex(std::string_view pattern, bool literal, const std::string& origin) {
  int error;
  PCRE2_SIZE offset;
  uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
  Regex re(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                         &error, &offset, nullptr));
  if (!re) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    throw Error(origin + ": cannot compile pre-tokenizer regex '" + std::string(pattern) +
                "' at offset " + std::to_string(offset) + ": " + reinterpret_cast<char*>(message));
  }
  // Without JIT (unsupported CPU) pcre2_match interprets the pattern: slower, same matches.
  pcre2_jit_compile(re.get(), PCRE2_JIT_COMPLETE);
  return re;
}

// Finds the first non-empty match of `re` in text[from..]; false when there is none.
// The text was validated as UTF-8 once in encode(), so PCRE2 does not re-check it on every call.
bool next_match(const pcre2_code* re, std::string_view text, size_t from, pcre2_match_data* md,
                size_t* begin, size_t* end) {
  while (from <= text.size()) {
    int rc = pcre2_match(re, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), from,
                         PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      throw Error(std::string("Tokenizer::encode: regex match failed: ") +
                  reinterpret_cast<char*>(message));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    if (ov[1] > ov[0]) {
      *begin = ov[0];
      *end = ov[1];
      return true;
    }
    // An empty match yields no piece (HF drops empty splits): look again one character later.
    if (ov[0] == text.size()) return false;
    from = ov[0] + char_len(text, ov[0]);
  }
  return false;
}

// Whether cp is a word character as `\w` means it in the Rust regex crate, which HF uses for
// single_word (PCRE2's own \w lacks marks and connectors).
bool is_word_char(uint32_t cp) {
  static const Regex word = compile_regex(
      "[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]", false, "built-in");
  static thread_local MatchData md(pcre2_match_data_create(1, nullptr));
  std::string utf8;
  append_utf8(stand_in(cp), utf8);
  return pcre2_match(word.get(), reinterpret_cast<PCRE2_SPTR>(utf8.data()), utf8.size(), 0,
                     PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK, md.get(), nullptr) >= 0;
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json reader

// Bounds on a tokenizer.json, so a hostile one is refused before it costs much memory. Real files
// stay far below them: Gemma 3's, among the largest, is 33 MB with 262k tokens and 6k added tokens;
// Llama 3 has 280k merges; the settings nest 6 levels deep.
constexpr size_t kMaxJsonBytes = size_t{128} << 20;  // the whole file
constexpr int64_t kMaxTokenId = (1 << 21) - 1;       // 2M tokens: the vocabulary is a table by id
constexpr size_t kMaxMerges = size_t{1} << 22;       // 4M merges
constexpr size_t kMaxDomValues = size_t{1} << 20;    // JSON values outside vocab and merges (~100 bytes each)
constexpr size_t kMaxDepth = 64;                     // JSON nesting (the settings are read recursively)

// Builds a DOM for everything except model.vocab and model.merges, which it streams straight
// into flat arrays: Llama-3 has 128k vocab entries and 280k merges, and a DOM for them (hundreds
// of thousands of small allocations) would take most of the load time.
class TokenizerJsonReader final : public nlohmann::json_sax<json> {
 public:
  struct MergeSpan {
    uint32_t offset, a_len, b_len;  // merge_text[offset..] holds a then b
  };

  json root;
  bool has_vocab = false;
  std::vector<std::pair<std::string, int32_t>> vocab;
  std::string merge_text;
  std::vector<MergeSpan> merges;
  std::string error;

  bool null() override { return add(nullptr); }
  bool boolean(bool v) override { return add(v); }
  bool number_integer(number_integer_t v) override {
    return mode_ == Mode::Vocab ? vocab_entry(v) : add(v);
  }
  bool number_unsigned(number_unsigned_t v) override {
    return mode_ == Mode::Vocab ? vocab_entry(v > uint64_t(INT64_MAX) ? -1 : int64_t(v)) : add(v);
  }
  bool number_float(number_float_t v, const string_t&) override { return add(v); }
  bool binary(binary_t&) override { return fail("unexpected binary value"); }
  bool string(string_t& s) override {
    if (mode_ != Mode::Merges) return add(std::move(s));
    if (in_pair_) {
      if (++pair_strings_ == 1) pair_a_len_ = uint32_t(s.size());
      merge_text += s;
      return true;
    }
    // The older merge spelling, "a b".
    size_t space = s.find(' ');
    if (space == std::string::npos) return fail("model.merges entry '" + s + "' is not \"a b\"");
    if (merges.size() >= kMaxMerges) return too_many_merges();
    merges.push_back({uint32_t(merge_text.size()), uint32_t(space), uint32_t(s.size() - space - 1)});
    merge_text.append(s, 0, space);
    merge_text.append(s, space + 1);
    return true;
  }
  bool key(string_t& k) override {
    key_ = std::move(k);
    return true;
  }
  bool start_object(std::size_t) override {
    if (mode_ == Mode::Dom && is_model_field("vocab")) {
      mode_ = Mode::Vocab;
      has_vocab = true;
      return true;
    }
    return open(json::object());
  }
  bool end_object() override {
    if (mode_ == Mode::Vocab) mode_ = Mode::Dom;
    else stack_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override {
    if (mode_ == Mode::Dom && is_model_field("merges")) {
      mode_ = Mode::Merges;
      return true;
    }
    if (mode_ == Mode::Merges && !in_pair_) {
      in_pair_ = true;
      pair_strings_ = 0;
      pair_offset_ = uint32_t(merge_text.size());
      return true;
    }
    return open(json::array());
  }
  bool end_array() override {
    if (mode_ != Mode::Merges) {
      stack_.pop_back();
    } else if (in_pair_) {
      if (pair_strings_ != 2) return fail("a model.merges pair does not hold two strings");
      if (merges.size() >= kMaxMerges) return too_many_merges();
      merges.push_back({pair_offset_, pair_a_len_, uint32_t(merge_text.size() - pair_offset_ - pair_a_len_)});
      in_pair_ = false;
    } else {
      mode_ = Mode::Dom;
    }
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    error = e.what();
    return false;
  }

 private:
  enum class Mode { Dom, Vocab, Merges };

  bool fail(std::string message) {
    error = std::move(message);
    return false;
  }
  bool too_many_merges() { return fail("model.merges has more than " + std::to_string(kMaxMerges) + " entries"); }

  bool is_model_field(const char* name) const {
    return stack_.size() == 2 && stack_[1] == model_ && key_ == name;
  }

  bool vocab_entry(int64_t id) {
    if (id < 0 || id > kMaxTokenId)
      return fail("model.vocab id of '" + key_ + "' is out of range (at most " + std::to_string(kMaxTokenId) + ")");
    if (vocab.size() > size_t(kMaxTokenId)) return fail("model.vocab has more than " + std::to_string(kMaxTokenId + 1) + " entries");
    vocab.emplace_back(std::move(key_), int32_t(id));
    return true;
  }

  json& insert(json&& v) {
    dom_values_++;
    if (stack_.empty()) return root = std::move(v);
    json& parent = *stack_.back();
    if (parent.is_array()) {
      parent.push_back(std::move(v));
      return parent.back();
    }
    return parent[key_] = std::move(v);
  }

  bool add(json&& v) {
    if (mode_ != Mode::Dom) return fail("unexpected value inside model.vocab or model.merges");
    if (dom_values_ >= kMaxDomValues) return too_many_values();
    insert(std::move(v));
    return true;
  }

  bool open(json&& v) {
    if (mode_ != Mode::Dom) return fail("unexpected nesting inside model.vocab or model.merges");
    if (dom_values_ >= kMaxDomValues) return too_many_values();
    if (stack_.size() >= kMaxDepth) return fail("JSON nested deeper than " + std::to_string(kMaxDepth) + " levels");
    bool is_model = stack_.size() == 1 && key_ == "model" && v.is_object();
    json& j = insert(std::move(v));
    if (is_model) model_ = &j;
    stack_.push_back(&j);  // parents are not touched while a child is open, so this stays valid
    return true;
  }

  bool too_many_values() {
    return fail("more than " + std::to_string(kMaxDomValues) + " JSON values outside model.vocab and model.merges");
  }

  Mode mode_ = Mode::Dom;
  size_t dom_values_ = 0;
  std::vector<json*> stack_;
  const json* model_ = nullptr;
  std::string key_;
  bool in_pair_ = false;
  int pair_strings_ = 0;
  uint32_t pair_offset_ = 0, pair_a_len_ = 0;
};

// A boolean field that may be absent or null.
bool get_flag(const json& obj, const char* name, bool fallback) {
  auto it = obj.find(name);
  return it == obj.end() || it->is_null() ? fallback : it->get<bool>();
}

std::string type_of(const json& obj) {
  auto it = obj.find("type");
  return it == obj.end() ? "" : it->get<std::string>();
}

// ---------------------------------------------------------------------------------------------
// Pipeline pieces

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, single_word, lstrip, rstrip;
};

// Finds added tokens in text, leftmost first and longest at that position: the matches of the
// Aho-Corasick automaton (MatchKind::LeftmostLongest) HF uses. A trie walked from each candidate
// start finds the same ones; a first-byte filter skips most positions at once.
class LiteralTrie {
 public:
  void insert(std::string_view s, int32_t token) {
    int32_t node = 0;
    for (unsigned char c : s) {
      auto [it, inserted] = edges_.try_emplace(edge(node, c), int32_t(terminal_.size()));
      if (inserted) terminal_.push_back(-1);
      node = it->second;
    }
    terminal_[node] = token;
    first_byte_[static_cast<unsigned char>(s[0])] = true;
  }

  // The longest token starting at text[pos], or -1. Sets *len to its length.
  int32_t longest_at(std::string_view text, size_t pos, size_t* len) const {
    if (!first_byte_[static_cast<unsigned char>(text[pos])]) return -1;
    int32_t node = 0, found = -1;
    for (size_t i = pos; i < text.size(); i++) {
      auto it = edges_.find(edge(node, static_cast<unsigned char>(text[i])));
      if (it == edges_.end()) break;
      node = it->second;
      if (terminal_[node] >= 0) found = terminal_[node], *len = i + 1 - pos;
    }
    return found;
  }

 private:
  static uint64_t edge(int32_t node, unsigned char c) { return uint64_t(node) << 8 | c; }
  std::unordered_map<uint64_t, int32_t> edges_;
  std::vector<int32_t> terminal_{-1};  // per node: the token ending there (index), or -1
  std::array<bool, 256> first_byte_{};
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// One pre-tokenizer step. A Split cuts on `regex`; a ByteLevel step optionally prepends a space,
// cuts on GPT-2's regex when use_regex is set, then spells every byte in the byte-level alphabet.
struct PreTokenizerStep {
  bool byte_level = false;
  Regex regex;  // null for a ByteLevel step without use_regex
  bool literal = false;  // a Split on a String: matched as it is, without stand-ins
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;
};

constexpr const char* kGpt2Regex =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct Span {
  size_t begin, end;
  bool is_match;
  int32_t added = -1;  // for an added-token match: index into Tokenizer::Impl::added
};

// Applies HF's SplitDelimiterBehavior to `parts` (the matches and the gaps between them, in order,
// covering the text) and appends the resulting non-empty pieces to `out`.
void apply_behavior(const std::vector<Span>& parts, SplitBehavior behavior, std::vector<Span>& out) {
  size_t first = out.size();
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::Removed:
      for (const Span& p : parts)
        if (!p.is_match) out.push_back(p);
      return;
    case SplitBehavior::Isolated:
      out.insert(out.end(), parts.begin(), parts.end());
      return;
    case SplitBehavior::Contiguous:  // runs of adjacent matches become one piece
      for (const Span& p : parts) {
        if (p.is_match && previous_match) out.back().end = p.end;
        else out.push_back(p);
        previous_match = p.is_match;
      }
      return;
    case SplitBehavior::MergedWithPrevious:  // a match joins the gap before it
      for (const Span& p : parts) {
        if (p.is_match && !previous_match && out.size() > first) out.back().end = p.end;
        else out.push_back(p);
        previous_match = p.is_match;
      }
      return;
    case SplitBehavior::MergedWithNext:  // a match joins the gap after it
      for (size_t i = 0; i < parts.size(); i++) {
        const Span& p = parts[i];
        if (i + 1 < parts.size() && p.is_match && !parts[i + 1].is_match) {
          out.push_back({p.begin, parts[i + 1].end, false});
          i++;
        } else {
          out.push_back(p);
        }
      }
      return;
  }
}

struct BpeModel {
  Vocab vocab;
  MergeTable merges;
  bool ignore_merges = false;
  bool fuse_unk = false;
  int32_t unk_id = -1;                // -1: characters outside the vocabulary are dropped, as in HF
  std::array<int32_t, 256> byte_ids;  // <0xNN> tokens for byte_fallback; all -1 when it is off
};

// Reused buffers of one encode() call.
struct EncodeScratch {
  struct Step {
    std::string prefixed, mapped, subject;  // subject: the text with stand-ins, for the regex
    std::vector<Span> parts, pieces;
  };
  struct Symbol {
    int32_t id, prev, next;  // id -1: merged into its left neighbour
  };
  struct Candidate {
    uint32_t rank, pos;
    // Lowest rank first, then leftmost: HF's merge order.
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };

  MatchData match_data{pcre2_match_data_create(1, nullptr)};
  std::vector<Step> steps;
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
};

// Words already merged, shared by all encode() calls. Like HF, it stops growing once full and
// skips long words, so it stays bounded however much text goes through.
struct WordCache {
  static constexpr size_t kMaxEntries = 200000;
  static constexpr size_t kMaxWordBytes = 256;
  std::mutex mutex;
  StringMap<std::pair<uint32_t, uint32_t>> words;  // word -> (offset, count) in ids
  std::vector<int32_t> ids;
};

}  // namespace

// ---------------------------------------------------------------------------------------------

struct Tokenizer::Impl {
  std::string origin;
  BpeModel model;
  std::vector<AddedToken> added;
  StringMap<int32_t> added_index;       // content -> index into added
  std::vector<int32_t> added_by_id;     // id -> index into added, or -1
  LiteralTrie raw_tokens;               // added tokens matched on the raw text (normalized: false)
  LiteralTrie normalized_tokens;        // normalized: true (no normalizer, so the same text)
  std::vector<PreTokenizerStep> pre_tokenizer;
  std::vector<int32_t> template_prefix, template_suffix;  // ids around the text for add_special
  int32_t vocab_size = 0;
  mutable WordCache cache;

  [[noreturn]] void fail(const std::string& message) const { throw Error(origin + ": " + message); }

  void load_model(TokenizerJsonReader& reader);
  void load_added_tokens(const json& root);
  void add_pre_tokenizer(const json& pt);
  void add_post_processor(const json& pp);

  void find_added(std::string_view text, const LiteralTrie& trie, std::vector<Span>& out) const;
  void pre_tokenize(size_t step, std::string_view piece, EncodeScratch& s,
                    std::vector<int32_t>& ids) const;
  void encode_word(std::string_view word, EncodeScratch& s, std::vector<int32_t>& ids) const;
  void merge_word(std::string_view word, EncodeScratch& s, std::vector<int32_t>& ids) const;
};

// ---------------------------------------------------------------------------------------------
// Loading

void Tokenizer::Impl::load_model(TokenizerJsonReader& reader) {
  auto it = reader.root.find("model");
  if (it == reader.root.end() || !it->is_object()) fail("no \"model\" object");
  const json& m = *it;
  // Old files leave out the type; HF then recognises a BPE model by its merges.
  std::string type = type_of(m);
  if (type.empty() && reader.merges.empty()) fail("model.type is missing");
  if (!type.empty() && type != "BPE") fail("unsupported model type '" + type + "' (only BPE is supported)");
  if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() != 0.0)
    fail("unsupported BPE feature: dropout");
  for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(affix) && !m[affix].is_null() && !m[affix].get<std::string>().empty())
      fail(std::string("unsupported BPE feature: ") + affix);
  if (!reader.has_vocab) fail("model.vocab is missing");

  BpeModel& bpe = model;
  bpe.ignore_merges = get_flag(m, "ignore_merges", false);
  bpe.fuse_unk = get_flag(m, "fuse_unk", false);

  bpe.vocab.assign(std::move(reader.vocab));

  if (m.contains("unk_token") && !m["unk_token"].is_null()) {
    std::string unk = m["unk_token"].get<std::string>();
    auto id = bpe.vocab.find(unk);
    if (!id) fail("model.unk_token '" + unk + "' is not in the vocabulary");
    bpe.unk_id = *id;
  }
  bpe.byte_ids.fill(-1);
  if (get_flag(m, "byte_fallback", false)) {
    for (int b = 0; b < 256; b++) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      if (auto id = bpe.vocab.find(name)) bpe.byte_ids[b] = *id;
    }
  }

  bpe.merges.reserve(reader.merges.size());
  std::string merged;
  for (size_t rank = 0; rank < reader.merges.size(); rank++) {
    const auto& span = reader.merges[rank];
    std::string_view a(reader.merge_text.data() + span.offset, span.a_len);
    std::string_view b(reader.merge_text.data() + span.offset + span.a_len, span.b_len);
    merged.assign(a).append(b);
    auto ia = bpe.vocab.find(a), ib = bpe.vocab.find(b), im = bpe.vocab.find(merged);
    if (!ia || !ib || !im)
      fail("merge '" + std::string(a) + " " + std::string(b) + "' uses a token missing from the vocabulary");
    bpe.merges.set(*ia, *ib, {uint32_t(rank), *im});
  }
}

void Tokenizer::Impl::load_added_tokens(const json& root) {
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return;
  for (const json& t : *it) {
    const int64_t id = t.at("id").get<int64_t>();
    if (id < 0 || id > kMaxTokenId) fail("added token id " + std::to_string(id) + " is out of range");
    AddedToken token{t.at("content").get<std::string>(), int32_t(id), get_flag(t, "special", false),
                     get_flag(t, "single_word", false), get_flag(t, "lstrip", false), get_flag(t, "rstrip", false)};
    if (token.content.empty()) fail("added token with empty content");
    int32_t index = int32_t(added.size());
    added_index[token.content] = index;
    // HF matches `normalized` tokens on the normalized text; without a normalizer that is the
    // same text, but HF still looks for them in a second pass, after the raw ones.
    (get_flag(t, "normalized", true) ? normalized_tokens : raw_tokens).insert(token.content, index);
    added.push_back(std::move(token));
  }
}

void Tokenizer::Impl::add_pre_tokenizer(const json& pt) {
  if (pt.is_null()) return;
  std::string type = type_of(pt);
  PreTokenizerStep step;
  if (type == "Sequence") {
    for (const json& p : pt.at("pretokenizers")) add_pre_tokenizer(p);
    return;
  } else if (type == "Split") {
    const json& pattern = pt.at("pattern");
    step.literal = pattern.contains("String");
    if (pattern.contains("Regex")) step.regex = compile_regex(pattern["Regex"].get<std::string>(), false, origin);
    else if (step.literal) step.regex = compile_regex(pattern["String"].get<std::string>(), true, origin);
    else fail("Split pre-tokenizer pattern is neither Regex nor String");
    static const std::pair<const char*, SplitBehavior> behaviors[] = {
        {"Removed", SplitBehavior::Removed},
        {"Isolated", SplitBehavior::Isolated},
        {"MergedWithPrevious", SplitBehavior::MergedWithPrevious},
        {"MergedWithNext", SplitBehavior::MergedWithNext},
        {"Contiguous", SplitBehavior::Contiguous}};
    std::string behavior = pt.at("behavior").get<std::string>();
    auto b = std::find_if(std::begin(behaviors), std::end(behaviors),
                          [&](const auto& entry) { return behavior == entry.first; });
    if (b == std::end(behaviors)) fail("unsupported Split behavior '" + behavior + "'");
    step.behavior = b->second;
    step.invert = get_flag(pt, "invert", false);
  } else if (type == "ByteLevel") {
    step.byte_level = true;
    step.add_prefix_space = get_flag(pt, "add_prefix_space", true);
    if (get_flag(pt, "use_regex", true)) step.regex = compile_regex(kGpt2Regex, false, origin);
  } else {
    fail("unsupported pre_tokenizer type '" + type + "' (supported: Split, ByteLevel, Sequence)");
  }
  pre_tokenizer.push_back(std::move(step));
}

void Tokenizer::Impl::add_post_processor(const json& pp) {
  if (pp.is_null()) return;
  std::string type = type_of(pp);
  if (type == "ByteLevel") return;  // it only trims offsets, which afm does not report
  if (type == "Sequence") {
    for (const json& p : pp.at("processors")) add_post_processor(p);
    return;
  }
  if (type != "TemplateProcessing")
    fail("unsupported post_processor type '" + type + "' (supported: TemplateProcessing, ByteLevel, Sequence)");
  // A later processor of a Sequence wraps the output of the earlier ones.
  std::vector<int32_t> prefix, suffix;
  bool after_text = false;
  for (const json& item : pp.at("single")) {
    if (item.contains("Sequence")) {
      if (item["Sequence"].at("id").get<std::string>() != "A")
        fail("TemplateProcessing single template uses a sequence other than $A");
      after_text = true;
    } else if (item.contains("SpecialToken")) {
      std::string name = item["SpecialToken"].at("id").get<std::string>();
      const json& specials = pp.at("special_tokens");
      auto special = specials.find(name);
      if (special == specials.end()) fail("TemplateProcessing special token '" + name + "' is not defined");
      for (const json& id : special->at("ids")) (after_text ? suffix : prefix).push_back(id.get<int32_t>());
    } else {
      fail("unsupported TemplateProcessing item " + item.dump());
    }
  }
  template_prefix.insert(template_prefix.begin(), prefix.begin(), prefix.end());
  template_suffix.insert(template_suffix.end(), suffix.begin(), suffix.end());
}

namespace {
std::string too_large(const std::string& origin) {
  return origin + ": the tokenizer JSON is larger than " + std::to_string(kMaxJsonBytes >> 20) + " MiB";
}
}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw Error("cannot open tokenizer file '" + path + "': " + std::strerror(errno));
  // Refused before reading where the size is known; otherwise (a pipe) once it has read too much.
  std::error_code size_error;
  if (auto bytes = std::filesystem::file_size(path, size_error); !size_error && bytes > kMaxJsonBytes) {
    std::fclose(f);
    throw Error(too_large(path));
  }
  std::string text;
  char buffer[1 << 16];
  for (size_t n; text.size() <= kMaxJsonBytes && (n = std::fread(buffer, 1, sizeof(buffer), f)) > 0;) text.append(buffer, n);
  bool failed = std::ferror(f);
  std::fclose(f);
  if (failed) throw Error("cannot read tokenizer file '" + path + "'");
  if (text.size() > kMaxJsonBytes) throw Error(too_large(path));
  return from_json(text, path);
}

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& origin) {
  if (json_text.size() > kMaxJsonBytes) throw Error(too_large(origin));
  TokenizerJsonReader reader;
  if (!json::sax_parse(json_text, &reader) || !reader.root.is_object())
    throw Error(origin + ": malformed tokenizer JSON: " +
                (reader.error.empty() ? "the top level is not an object" : reader.error));

  auto impl = std::make_unique<Impl>();
  impl->origin = origin;
  const json& root = reader.root;
  try {
    impl->load_model(reader);
    impl->load_added_tokens(root);
    const json& normalizer = root.value("normalizer", json());
    if (!normalizer.is_null() &&
        !(type_of(normalizer) == "Sequence" && normalizer.value("normalizers", json::array()).empty()))
      impl->fail("unsupported normalizer type '" + type_of(normalizer) + "' (only none is supported)");
    impl->add_pre_tokenizer(root.value("pre_tokenizer", json()));
    impl->add_post_processor(root.value("post_processor", json()));
    const json& decoder = root.value("decoder", json());
    if (decoder.is_null() || type_of(decoder) != "ByteLevel")
      impl->fail("unsupported decoder type '" + (decoder.is_null() ? "none" : type_of(decoder)) +
                 "' (only ByteLevel is supported)");
    // truncation and padding are left to the caller, as transformers does.
  } catch (const json::exception& e) {
    throw Error(origin + ": invalid tokenizer.json: " + e.what());
  }

  int32_t size = impl->model.vocab.size();
  for (const AddedToken& t : impl->added) size = std::max(size, t.id + 1);
  impl->vocab_size = size;
  impl->added_by_id.assign(size_t(size), -1);
  for (size_t i = 0; i < impl->added.size(); i++) impl->added_by_id[impl->added[i].id] = int32_t(i);
  for (int32_t id : impl->template_prefix)
    if (id < 0 || id >= size) impl->fail("post_processor template id " + std::to_string(id) + " is out of range");
  for (int32_t id : impl->template_suffix)
    if (id < 0 || id >= size) impl->fail("post_processor template id " + std::to_string(id) + " is out of range");
  return Tokenizer(std::move(impl));
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

// ---------------------------------------------------------------------------------------------
// Encoding

// Cuts text into added-token matches (is_match) and the gaps between them, as HF's find_matches:
// leftmost-longest matches; a single_word token touching a word character is dropped (and the
// search goes on after it); lstrip/rstrip widen a match over the whitespace around it.
void Tokenizer::Impl::find_added(std::string_view text, const LiteralTrie& trie,
                                 std::vector<Span>& out) const {
  size_t gap_start = 0;  // end of the previous match
  for (size_t pos = 0; pos < text.size();) {
    size_t len = 0;
    int32_t index = trie.longest_at(text, pos, &len);
    if (index < 0) {
      pos++;
      continue;
    }
    const AddedToken& token = added[index];
    size_t begin = pos, end = pos + len;
    pos = end;
    if (token.single_word && ((begin > 0 && is_word_char(decode_char(text, prev_char_start(text, begin)))) ||
                              (end < text.size() && is_word_char(decode_char(text, end)))))
      continue;
    if (token.lstrip) {
      while (begin > gap_start) {
        size_t prev = prev_char_start(text, begin);
        if (!is_unicode_space(decode_char(text, prev))) break;
        begin = prev;
      }
    }
    if (token.rstrip)
      while (end < text.size() && is_unicode_space(decode_char(text, end))) end += char_len(text, end);
    if (begin > gap_start) out.push_back({gap_start, begin, false});
    out.push_back({begin, end, true, index});
    gap_start = pos = end;
  }
  if (gap_start < text.size()) out.push_back({gap_start, text.size(), false});
}

// Runs pre-tokenizer step `step` on piece and everything after it on the resulting pieces.
void Tokenizer::Impl::pre_tokenize(size_t step, std::string_view piece, EncodeScratch& s,
                                   std::vector<int32_t>& ids) const {
  if (piece.empty()) return;  // HF drops empty splits
  if (step == pre_tokenizer.size()) {
    encode_word(piece, s, ids);
    return;
  }
  const PreTokenizerStep& pt = pre_tokenizer[step];
  EncodeScratch::Step& buf = s.steps[step];  // deeper steps use their own buffers

  std::string_view text = piece;
  if (pt.byte_level && pt.add_prefix_space && piece[0] != ' ') {
    buf.prefixed.assign(1, ' ').append(piece);
    text = buf.prefixed;
  }
  buf.pieces.clear();
  if (!pt.regex) {
    buf.pieces.push_back({0, text.size(), false});
  } else {
    buf.parts.clear();
    std::string_view subject = !pt.literal && with_stand_ins(text, &buf.subject) ? std::string_view(buf.subject) : text;
    size_t done = 0, begin, end;
    while (next_match(pt.regex.get(), subject, done, s.match_data.get(), &begin, &end)) {
      if (begin > done) buf.parts.push_back({done, begin, pt.invert});
      buf.parts.push_back({begin, end, !pt.invert});
      done = end;
    }
    if (done < text.size()) buf.parts.push_back({done, text.size(), pt.invert});
    apply_behavior(buf.parts, pt.behavior, buf.pieces);
  }

  for (const Span& p : buf.pieces) {
    std::string_view sub = text.substr(p.begin, p.end - p.begin);
    if (!pt.byte_level) {
      pre_tokenize(step + 1, sub, s, ids);
      continue;
    }
    const ByteLevelAlphabet& alphabet = byte_level();
    buf.mapped.clear();
    for (unsigned char c : sub) buf.mapped.append(alphabet.utf8[c].data(), alphabet.utf8_len[c]);
    pre_tokenize(step + 1, buf.mapped, s, ids);
  }
}

void Tokenizer::Impl::encode_word(std::string_view word, EncodeScratch& s,
                                  std::vector<int32_t>& ids) const {
  if (model.ignore_merges) {
    if (auto id = model.vocab.find(word)) {
      ids.push_back(*id);
      return;
    }
  }
  {
    std::lock_guard lock(cache.mutex);
    auto it = cache.words.find(word);
    if (it != cache.words.end()) {
      auto [offset, count] = it->second;
      ids.insert(ids.end(), cache.ids.begin() + offset, cache.ids.begin() + offset + count);
      return;
    }
  }
  size_t first = ids.size();
  merge_word(word, s, ids);
  if (word.size() >= WordCache::kMaxWordBytes) return;
  std::lock_guard lock(cache.mutex);
  if (cache.words.size() >= WordCache::kMaxEntries) return;
  auto [it, inserted] = cache.words.try_emplace(std::string(word), uint32_t(cache.ids.size()),
                                                uint32_t(ids.size() - first));
  if (inserted) cache.ids.insert(cache.ids.end(), ids.begin() + first, ids.end());
}

// BPE: start from one symbol per character, then repeatedly merge the adjacent pair with the
// lowest merge rank (leftmost on ties). A min-heap of candidate pairs makes it O(n log n);
// candidates made stale by earlier merges are recognised on pop and skipped.
void Tokenizer::Impl::merge_word(std::string_view word, EncodeScratch& s,
                                 std::vector<int32_t>& ids) const {
  auto& symbols = s.symbols;
  symbols.clear();
  auto push = [&](int32_t id) {
    int32_t n = int32_t(symbols.size());
    symbols.push_back({id, n - 1, -1});
    if (n > 0) symbols[n - 1].next = n;
  };
  bool last_was_unk = false;
  for (size_t i = 0; i < word.size();) {
    size_t len = char_len(word, i);
    std::string_view ch = word.substr(i, len);
    i += len;
    if (auto id = model.vocab.find(ch)) {
      push(*id);
      last_was_unk = false;
      continue;
    }
    if (std::all_of(ch.begin(), ch.end(), [&](char c) { return model.byte_ids[uint8_t(c)] >= 0; })) {
      for (char c : ch) push(model.byte_ids[uint8_t(c)]);
      last_was_unk = false;
      continue;
    }
    if (model.unk_id < 0) continue;  // no unk token: HF silently drops the character
    if (!(model.fuse_unk && last_was_unk)) push(model.unk_id);
    last_was_unk = true;
  }

  auto& heap = s.heap;
  heap.clear();
  auto consider = [&](int32_t pos) {
    int32_t next = symbols[pos].next;
    if (next < 0) return;
    if (const MergeTable::Entry* m = model.merges.find(symbols[pos].id, symbols[next].id)) {
      heap.push_back({m->rank, uint32_t(pos)});
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  };
  for (int32_t i = 0; i + 1 < int32_t(symbols.size()); i++) consider(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>());
    EncodeScratch::Candidate c = heap.back();
    heap.pop_back();
    EncodeScratch::Symbol& left = symbols[c.pos];
    if (left.id < 0 || left.next < 0) continue;
    EncodeScratch::Symbol& right = symbols[left.next];
    const MergeTable::Entry* m = model.merges.find(left.id, right.id);
    if (!m || m->rank != c.rank) continue;  // this pair changed since it was queued
    left.id = m->id;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = int32_t(c.pos);
    if (left.prev >= 0) consider(left.prev);
    consider(int32_t(c.pos));
  }
  for (int32_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  if (!is_valid_utf8(text)) throw Error("Tokenizer::encode: the text is not valid UTF-8");
  const Impl& t = *impl_;
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = t.template_prefix;

  EncodeScratch scratch;
  scratch.steps.resize(t.pre_tokenizer.size());
  std::vector<Span> raw_parts, parts;
  t.find_added(text, t.raw_tokens, raw_parts);
  for (const Span& raw : raw_parts) {
    if (raw.is_match) {
      ids.push_back(t.added[raw.added].id);
      continue;
    }
    std::string_view raw_text = text.substr(raw.begin, raw.end - raw.begin);
    parts.clear();
    t.find_added(raw_text, t.normalized_tokens, parts);
    for (const Span& p : parts) {
      if (p.is_match) ids.push_back(t.added[p.added].id);
      else t.pre_tokenize(0, raw_text.substr(p.begin, p.end - p.begin), scratch, ids);
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), t.template_suffix.begin(), t.template_suffix.end());
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Decoding and lookups

void Tokenizer::append_token_bytes(int32_t id, bool skip_special_tokens, std::string& out) const {
  const Impl& t = *impl_;
  if (id < 0 || id >= t.vocab_size) return;
  std::string_view token;
  if (int32_t a = t.added_by_id[id]; a >= 0) {
    if (skip_special_tokens && t.added[a].special) return;
    token = t.added[a].content;
  } else if (t.model.vocab.has(id)) {
    token = t.model.vocab.token(id);
  } else {
    return;
  }
  // HF's ByteLevel decoder: each character back to its byte; a token with any character outside
  // the alphabet (typically an added token) is taken as it is.
  const ByteLevelAlphabet& alphabet = byte_level();
  size_t start = out.size();
  for (size_t i = 0; i < token.size(); i += char_len(token, i)) {
    uint32_t cp = decode_char(token, i);
    if (cp >= alphabet.byte_of.size() || alphabet.byte_of[cp] < 0) {
      out.resize(start);
      out.append(token);
      return;
    }
    out += char(alphabet.byte_of[cp]);
  }
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int32_t id : ids) append_token_bytes(id, skip_special_tokens, bytes);
  if (is_valid_utf8(bytes)) return bytes;
  std::string text;
  append_utf8_lossy(bytes, text);
  return text;
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added_index.find(token); it != impl_->added_index.end())
    return impl_->added[it->second].id;
  return impl_->model.vocab.find(token);
}

const std::string& Tokenizer::token_text(int32_t id) const {
  const Impl& t = *impl_;
  if (id >= 0 && id < t.vocab_size) {
    if (int32_t a = t.added_by_id[id]; a >= 0) return t.added[a].content;
    if (t.model.vocab.has(id)) return t.model.vocab.token(id);
  }
  throw Error("Tokenizer::token_text: no token has id " + std::to_string(id));
}

bool Tokenizer::is_special(int32_t id) const {
  const Impl& t = *impl_;
  return id >= 0 && id < t.vocab_size && t.added_by_id[id] >= 0 && t.added[t.added_by_id[id]].special;
}

std::string byte_level_spelling(std::string_view bytes) {
  const ByteLevelAlphabet& alphabet = byte_level();
  std::string out;
  for (unsigned char b : bytes) out.append(alphabet.utf8[b].data(), alphabet.utf8_len[b]);
  return out;
}

bool is_byte_level_spelled(std::string_view text) {
  if (!is_valid_utf8(text)) return false;
  for (size_t i = 0; i < text.size(); i += char_len(text, i)) {
    const uint32_t cp = decode_char(text, i);
    if (cp >= byte_level().byte_of.size() || byte_level().byte_of[cp] < 0) return false;
  }
  return true;
}

void append_utf8_lossy(std::string_view bytes, std::string& out) {
  auto p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    bool complete;
    size_t len = utf8_prefix(p + i, bytes.size() - i, &complete);
    if (complete) {
      out.append(bytes.data() + i, len);
    } else {
      out += "\xEF\xBF\xBD";  // one U+FFFD per maximal ill-formed subsequence
      len = std::max<size_t>(len, 1);
    }
    i += len;
  }
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(&tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string StreamDecoder::push(int32_t id) {
  tokenizer_->append_token_bytes(id, skip_special_tokens_, pending_);
  // Hold back a trailing, well-formed but unfinished character: the next token may complete it.
  // Everything before it decodes the same now as it would in one decode() of all the ids,
  // because a character start always ends any ill-formed run before it.
  size_t hold = 0;
  for (size_t k = 1; k <= std::min<size_t>(3, pending_.size()); k++) {
    size_t start = pending_.size() - k;
    if ((static_cast<unsigned char>(pending_[start]) & 0xC0) == 0x80) continue;
    bool complete;
    size_t len = utf8_prefix(reinterpret_cast<const unsigned char*>(pending_.data()) + start, k, &complete);
    if (!complete && len == k) hold = k;
    break;
  }
  std::string text;
  append_utf8_lossy(std::string_view(pending_).substr(0, pending_.size() - hold), text);
  pending_.erase(0, pending_.size() - hold);
  return text;
}

std::string StreamDecoder::flush() {
  std::string text;
  append_utf8_lossy(pending_, text);
  pending_.clear();
  return text;
}

}  // namespace afm
