// Jinja2-subset interpreter for HuggingFace chat templates.
// Semantics follow Jinja2 as configured by transformers' apply_chat_template: trim_blocks=True,
// lstrip_blocks=True, the loopcontrols extension, the `generation` tag, and a tojson that does not
// escape HTML. Values behave like the Python objects they stand for (str(), repr(), slicing,
// truthiness), because templates are written against Python and the prompt must match byte for byte.
#include "chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "error.h"

namespace afm::jinja {

// ------------------------------------------------------------------------------------------ errors

// "line 3, column 14" for a byte offset into the template source.
std::string where(const std::string& src, size_t pos) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i < pos && i < src.size(); i++) {
    if (src[i] == '\n') {
      line++;
      col = 1;
    } else {
      col++;
    }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(col);
}

[[noreturn]] void fail(const std::string& src, size_t pos, const std::string& what) {
  throw Error("chat template: " + what + " at " + where(src, pos));
}

// Bounds that keep a hostile template from exhausting the stack, the CPU or memory. Real chat
// templates stay far below them: a few levels of nesting, a loop over the messages, and prompts of
// at most a few MB (a million tokens).
constexpr int kMaxNesting = 256;                 // parser: nested expressions, blocks and chains
constexpr int kMaxCallDepth = 100;               // macro recursion
// Steps: loop iterations, macro calls and expression evaluations, about a microsecond each, so a
// render ends within a second. Real templates take 25 to 50 a message: 10,000 messages fit, more
// than a 64k-token context holds.
constexpr int64_t kMaxSteps = 500'000;
constexpr size_t kMaxSize = size_t{64} << 20;    // bytes of output, of one string
constexpr size_t kMaxItems = kMaxSteps;          // items of one list: no more than a render can loop over
constexpr size_t kMaxBuilt = size_t{512} << 20;  // bytes of all the values one render evaluates (time and memory)

// ------------------------------------------------------------------------------------------ values

struct Dict;
struct Node;

struct Value {
  enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict, Function };
  Kind kind = Kind::Undefined;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0.0;
  // String: the text. Function: the builtin's name. Undefined: what was missing, for error messages.
  std::string str;
  // Lists and dicts are shared like Python objects; only namespace() dicts are ever mutated.
  std::shared_ptr<std::vector<Value>> list;
  std::shared_ptr<Dict> dict;
  bool is_namespace = false;
  // A List that stands for a Python generator (what map, select and friends return): always true,
  // no length, not JSON, and used up by iterating it.
  bool is_generator = false;
  // Function made by {% macro %}: its definition, and how many scopes were open where it was defined.
  const Node* macro = nullptr;
  size_t macro_scopes = 0;
};

struct Dict {
  std::vector<std::pair<std::string, Value>> entries;  // insertion order, like Python dicts

  const Value* find(const std::string& key) const {
    for (const auto& [k, v] : entries)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    for (auto& [k, old] : entries) {
      if (k == key) {
        old = std::move(v);
        return;
      }
    }
    entries.emplace_back(key, std::move(v));
  }
};

using Kind = Value::Kind;

Value make_undefined(std::string what) {
  Value v;
  v.str = std::move(what);
  return v;
}
Value make_none() {
  Value v;
  v.kind = Kind::None;
  return v;
}
Value make_bool(bool b) {
  Value v;
  v.kind = Kind::Bool;
  v.boolean = b;
  return v;
}
Value make_int(int64_t i) {
  Value v;
  v.kind = Kind::Int;
  v.integer = i;
  return v;
}
Value make_float(double d) {
  Value v;
  v.kind = Kind::Float;
  v.number = d;
  return v;
}
Value make_string(std::string s) {
  Value v;
  v.kind = Kind::String;
  v.str = std::move(s);
  return v;
}
Value make_list(std::vector<Value> items) {
  Value v;
  v.kind = Kind::List;
  v.list = std::make_shared<std::vector<Value>>(std::move(items));
  return v;
}
Value make_generator(std::vector<Value> items) {
  Value v = make_list(std::move(items));
  v.is_generator = true;
  return v;
}
Value make_dict() {
  Value v;
  v.kind = Kind::Dict;
  v.dict = std::make_shared<Dict>();
  return v;
}
Value make_function(std::string name) {
  Value v;
  v.kind = Kind::Function;
  v.str = std::move(name);
  return v;
}

Value from_json(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return make_none();
    case nlohmann::json::value_t::boolean: return make_bool(j.get<bool>());
    case nlohmann::json::value_t::number_integer: return make_int(j.get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: return make_int(static_cast<int64_t>(j.get<uint64_t>()));
    case nlohmann::json::value_t::number_float: return make_float(j.get<double>());
    case nlohmann::json::value_t::string: return make_string(j.get<std::string>());
    case nlohmann::json::value_t::array: {
      std::vector<Value> items;
      for (const auto& item : j) items.push_back(from_json(item));
      return make_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      Value d = make_dict();
      for (auto it = j.begin(); it != j.end(); ++it) d.dict->set(it.key(), from_json(it.value()));
      return d;
    }
    default: throw Error("chat template: unsupported JSON value in the render context");
  }
}

const char* kind_name(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined: return "undefined";
    case Kind::None: return "none";
    case Kind::Bool: return "boolean";
    case Kind::Int: return "integer";
    case Kind::Float: return "float";
    case Kind::String: return "string";
    case Kind::List: return "list";
    case Kind::Dict: return v.is_namespace ? "namespace" : "dict";
    case Kind::Function: return "function";
  }
  return "?";
}

// "an integer", "a string": for error messages.
std::string a_kind(const Value& v) {
  std::string name = kind_name(v);
  return (std::string("aeiou").find(name[0]) != std::string::npos ? "an " : "a ") + name;
}

bool is_number(const Value& v) { return v.kind == Kind::Int || v.kind == Kind::Float; }
double as_double(const Value& v) { return v.kind == Kind::Int ? static_cast<double>(v.integer) : v.number; }

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
    case Kind::None: return false;
    case Kind::Bool: return v.boolean;
    case Kind::Int: return v.integer != 0;
    case Kind::Float: return v.number != 0.0;
    case Kind::String: return !v.str.empty();
    case Kind::List: return v.is_generator || !v.list->empty();
    case Kind::Dict: return v.is_namespace || !v.dict->entries.empty();
    case Kind::Function: return true;
  }
  return false;
}

// Python's float repr: shortest round-trip digits, scientific outside 1e-4 <= |d| < 1e16.
std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // e.g. "-1.25e+02"
  bool negative = sci[0] == '-';
  if (negative) sci.erase(0, 1);
  size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  int exp = std::stoi(sci.substr(e + 1));
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(-exp - 1, '0') + digits;
    } else if (digits.size() <= static_cast<size_t>(exp) + 1) {
      out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return negative ? "-" + out : out;
}

// Python's repr of a str, as seen when a list or dict is printed.
std::string py_repr_string(const std::string& s) {
  char quote = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, quote);
  for (unsigned char c : s) {
    if (c == '\\' || c == quote) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + quote;
}

std::string py_repr(const Value& v);

// Python's str(): what {{ }}, `~` and the `string` filter produce. Undefined prints as nothing.
std::string py_str(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined: return "";
    case Kind::None: return "None";
    case Kind::Bool: return v.boolean ? "True" : "False";
    case Kind::Int: return std::to_string(v.integer);
    case Kind::Float: return py_float(v.number);
    case Kind::String: return v.str;
    case Kind::List: {
      if (v.is_generator)  // Python prints "<generator object ... at 0x...>": no prompt can depend on that
        throw Error("chat template: unsupported construct: printing a generator (from map, select, ...); use |list");
      std::string out = "[";
      for (size_t i = 0; i < v.list->size(); i++) out += (i ? ", " : "") + py_repr((*v.list)[i]);
      return out + "]";
    }
    case Kind::Dict: {
      std::string out = "{";
      for (size_t i = 0; i < v.dict->entries.size(); i++) {
        const auto& [k, item] = v.dict->entries[i];
        out += (i ? ", " : "") + py_repr_string(k) + ": " + py_repr(item);
      }
      out += "}";
      return v.is_namespace ? "<Namespace " + out + ">" : out;
    }
    case Kind::Function: return "<built-in function " + v.str + ">";
  }
  return "";
}

std::string py_repr(const Value& v) { return v.kind == Kind::String ? py_repr_string(v.str) : py_str(v); }

bool values_equal(const Value& a, const Value& b) {
  if (a.kind == Kind::Bool && is_number(b)) return values_equal(make_int(a.boolean), b);  // True == 1 in Python
  if (b.kind == Kind::Bool && is_number(a)) return values_equal(a, make_int(b.boolean));
  if (is_number(a) && is_number(b)) {
    if (a.kind == Kind::Int && b.kind == Kind::Int) return a.integer == b.integer;
    return as_double(a) == as_double(b);
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::Undefined:
    case Kind::None: return true;
    case Kind::Bool: return a.boolean == b.boolean;
    case Kind::String:
    case Kind::Function: return a.str == b.str;
    case Kind::List:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); i++)
        if (!values_equal((*a.list)[i], (*b.list)[i])) return false;
      return true;
    case Kind::Dict:
      if (a.dict->entries.size() != b.dict->entries.size()) return false;
      for (const auto& [k, item] : a.dict->entries) {
        const Value* other = b.dict->find(k);
        if (!other || !values_equal(item, *other)) return false;
      }
      return true;
    default: return false;
  }
}

// Byte offsets where each UTF-8 code point starts, plus s.size(): Python indexes str by code point.
std::vector<size_t> char_starts(const std::string& s) {
  std::vector<size_t> starts;
  for (size_t i = 0; i < s.size(); i++)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) starts.push_back(i);
  starts.push_back(s.size());
  return starts;
}

// Python's str.splitlines(): breaks at \n, \r\n, \r, \v, \f, \x1c-\x1e, U+0085, U+2028 and U+2029.
std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> lines;
  std::string line;
  for (size_t i = 0; i < s.size(); i++) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t width = 0;  // bytes of the line break at i
    if (c == '\r') {
      width = i + 1 < s.size() && s[i + 1] == '\n' ? 2 : 1;
    } else if (c == '\n' || c == '\v' || c == '\f' || (c >= 0x1c && c <= 0x1e)) {
      width = 1;
    } else if (s.compare(i, 2, "\xc2\x85") == 0) {
      width = 2;
    } else if (s.compare(i, 3, "\xe2\x80\xa8") == 0 || s.compare(i, 3, "\xe2\x80\xa9") == 0) {
      width = 3;
    }
    if (width == 0) {
      line += s[i];
      continue;
    }
    lines.push_back(std::move(line));
    line.clear();
    i += width - 1;
  }
  if (!line.empty()) lines.push_back(std::move(line));
  return lines;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string strip_chars(const std::string& s, const std::string& chars, bool left, bool right) {
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && chars.find(s[b]) != std::string::npos) b++;
  if (right)
    while (e > b && chars.find(s[e - 1]) != std::string::npos) e--;
  return s.substr(b, e - b);
}

const std::string kWhitespace = " \t\n\r\f\v";

// Python slice semantics: the indices that seq[start:stop:step] selects from a sequence of length n.
std::vector<int64_t> slice_indices(int64_t n, const Value& start, const Value& stop, const Value& step) {
  int64_t st = step.kind == Kind::Int ? step.integer : 1;
  auto bound = [&](const Value& v, int64_t fallback) {
    if (v.kind != Kind::Int) return fallback;
    int64_t i = v.integer < 0 ? v.integer + n : v.integer;
    return st > 0 ? std::clamp<int64_t>(i, 0, n) : std::clamp<int64_t>(i, -1, n - 1);
  };
  int64_t b = bound(start, st > 0 ? 0 : n - 1);
  int64_t e = bound(stop, st > 0 ? n : -1);
  std::vector<int64_t> out;
  for (int64_t i = b; st > 0 ? i < e : i > e;) {
    out.push_back(i);
    if (__builtin_add_overflow(i, st, &i)) break;  // past the end either way
  }
  return out;
}

struct JsonOptions {
  int indent = -1;  // < 0: one line
  bool ensure_ascii = false;
  bool sort_keys = false;
};

// Python's json.dumps with HF's tojson defaults (ensure_ascii=False, no HTML escaping).
void dump_json(const Value& v, const JsonOptions& options, int level, std::string& out, const std::string& src,
               size_t pos) {
  const int indent = options.indent;
  auto newline = [&](int lvl) {
    if (indent >= 0) out += "\n" + std::string(static_cast<size_t>(indent * lvl), ' ');
  };
  auto quote = [&](const std::string& s) {
    out += '"';
    for (size_t i = 0; i < s.size(); i++) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      char buf[8];
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20 || (c == 0x7f && options.ensure_ascii)) {
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
          } else if (c >= 0x80 && options.ensure_ascii) {
            // One \uXXXX per code point, as a surrogate pair above U+FFFF.
            int extra = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : 1;
            uint32_t code = c & (0x3F >> extra);
            for (int k = 0; k < extra && i + 1 < s.size(); k++) code = (code << 6) | (s[++i] & 0x3F);
            if (code >= 0x10000) {
              std::snprintf(buf, sizeof buf, "\\u%04x", 0xD800 + ((code - 0x10000) >> 10));
              out += buf;
              code = 0xDC00 + ((code - 0x10000) & 0x3FF);
            }
            std::snprintf(buf, sizeof buf, "\\u%04x", code);
            out += buf;
          } else {
            out += static_cast<char>(c);
          }
      }
    }
    out += '"';
  };
  const char* comma = indent >= 0 ? "," : ", ";
  switch (v.kind) {
    case Kind::None: out += "null"; break;
    case Kind::Bool: out += v.boolean ? "true" : "false"; break;
    case Kind::Int: out += std::to_string(v.integer); break;
    case Kind::Float:
      out += std::isnan(v.number) ? "NaN" : std::isinf(v.number) ? (v.number < 0 ? "-Infinity" : "Infinity")
                                                                  : py_float(v.number);
      break;
    case Kind::String: quote(v.str); break;
    case Kind::List:
      if (v.is_generator) fail(src, pos, "tojson: a generator (from map, select, ...) is not JSON serializable");
      if (v.list->empty()) {
        out += "[]";
        break;
      }
      out += "[";
      for (size_t i = 0; i < v.list->size(); i++) {
        if (i) out += comma;
        newline(level + 1);
        dump_json((*v.list)[i], options, level + 1, out, src, pos);
      }
      newline(level);
      out += "]";
      break;
    case Kind::Dict: {
      if (v.dict->entries.empty()) {
        out += "{}";
        break;
      }
      out += "{";
      std::vector<const std::pair<std::string, Value>*> entries;
      for (const auto& entry : v.dict->entries) entries.push_back(&entry);
      if (options.sort_keys)  // by code point, which is byte order in UTF-8
        std::sort(entries.begin(), entries.end(), [](auto* a, auto* b) { return a->first < b->first; });
      for (size_t i = 0; i < entries.size(); i++) {
        if (i) out += comma;
        newline(level + 1);
        quote(entries[i]->first);
        out += ": ";
        dump_json(entries[i]->second, options, level + 1, out, src, pos);
      }
      newline(level);
      out += "}";
      break;
    }
    default: fail(src, pos, "tojson cannot serialize " + a_kind(v) + " value");
  }
}

// ------------------------------------------------------------------------------------------ lexer

struct Token {
  enum class Kind { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };
  Kind kind;
  std::string text;  // literal text, identifier, decoded string, number digits or operator
  size_t pos;
};
using Tok = Token::Kind;

// Splits the source into text and tag tokens, applying whitespace control as it goes:
// `-` on a tag strips all whitespace on that side; trim_blocks drops the first newline after a
// block or comment tag; lstrip_blocks drops spaces/tabs between a line start and a block or comment
// tag; `+` disables the latter two.
class Lexer {
 public:
  explicit Lexer(const std::string& src) : src_(src) {}

  std::vector<Token> run() {
    size_t pos = 0;
    bool strip_next = false;  // the previous tag ended with '-'
    for (;;) {
      if (strip_next)
        while (pos < src_.size() && is_space(src_[pos])) pos++;
      strip_next = false;
      bool line_start = pos == 0 || src_[pos - 1] == '\n';
      size_t open = find_tag(pos);
      std::string text = src_.substr(pos, (open == std::string::npos ? src_.size() : open) - pos);
      char type = open == std::string::npos ? '\0' : src_[open + 1];
      char mod = open != std::string::npos && open + 2 < src_.size() ? src_[open + 2] : '\0';
      if (mod == '-') {
        text = strip_chars(text, kWhitespace, false, true);
      } else if (type == '%' || type == '#') {
        if (mod != '+') lstrip_block(text, line_start);
      }
      if (!text.empty()) tokens_.push_back({Tok::Text, text, pos});
      if (open == std::string::npos) break;
      bool has_mod = mod == '-' || (mod == '+' && type != '{');
      pos = open + 2 + (has_mod ? 1 : 0);
      if (type == '#') {
        size_t close = src_.find("#}", pos);
        if (close == std::string::npos) fail(src_, open, "unclosed comment");
        char end_mod = close > pos ? src_[close - 1] : '\0';
        pos = close + 2;
        strip_next = end_mod == '-';
        if (end_mod != '-' && end_mod != '+' && pos < src_.size() && src_[pos] == '\n') pos++;
      } else {
        size_t first = tokens_.size();
        tokens_.push_back({type == '{' ? Tok::VarBegin : Tok::BlockBegin, "", open});
        pos = lex_tag(pos, type == '%', open, strip_next);
        // The body of {% raw %} is not Jinja syntax, so it cannot be tokenized: reject it here.
        if (type == '%' && tokens_[first + 1].kind == Tok::Name && tokens_[first + 1].text == "raw")
          fail(src_, open, "unsupported tag 'raw'");
      }
    }
    tokens_.push_back({Tok::Eof, "", src_.size()});
    return std::move(tokens_);
  }

 private:
  const std::string& src_;
  std::vector<Token> tokens_;

  size_t find_tag(size_t pos) const {
    for (size_t i = src_.find('{', pos); i != std::string::npos; i = src_.find('{', i + 1)) {
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    }
    return std::string::npos;
  }

  // lstrip_blocks: only when the tag is preceded by nothing but spaces/tabs since a line start.
  static void lstrip_block(std::string& text, bool line_start) {
    size_t nl = text.rfind('\n');
    size_t from = nl == std::string::npos ? 0 : nl + 1;
    if (nl == std::string::npos && !line_start) return;
    if (text.find_first_not_of(" \t", from) == std::string::npos) text.erase(from);
  }

  // Tokenizes a tag's expression up to its closing delimiter; returns the position after it.
  size_t lex_tag(size_t pos, bool is_block, size_t open, bool& strip_next) {
    int depth = 0;  // brackets open: `}}` inside a dict literal does not close the tag
    for (;;) {
      while (pos < src_.size() && is_space(src_[pos])) pos++;
      if (pos >= src_.size()) fail(src_, open, is_block ? "unclosed '{%' tag" : "unclosed '{{' tag");
      const char* end = is_block ? "%}" : "}}";
      if (depth == 0) {
        if ((src_[pos] == '-' || (is_block && src_[pos] == '+')) && src_.compare(pos + 1, 2, end) == 0) {
          tokens_.push_back({is_block ? Tok::BlockEnd : Tok::VarEnd, "", pos});
          strip_next = src_[pos] == '-';
          return pos + 3;
        }
        if (src_.compare(pos, 2, end) == 0) {
          tokens_.push_back({is_block ? Tok::BlockEnd : Tok::VarEnd, "", pos});
          pos += 2;
          if (is_block && pos < src_.size() && src_[pos] == '\n') pos++;  // trim_blocks
          return pos;
        }
      }
      char c = src_[pos];
      size_t start = pos;
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        while (pos < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[pos])) || src_[pos] == '_')) pos++;
        tokens_.push_back({Tok::Name, src_.substr(start, pos - start), start});
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        while (pos < src_.size() && std::isdigit(static_cast<unsigned char>(src_[pos]))) pos++;
        bool is_float = pos + 1 < src_.size() && src_[pos] == '.' &&
                        std::isdigit(static_cast<unsigned char>(src_[pos + 1]));
        if (is_float) {
          pos++;
          while (pos < src_.size() && std::isdigit(static_cast<unsigned char>(src_[pos]))) pos++;
        }
        tokens_.push_back({is_float ? Tok::Float : Tok::Int, src_.substr(start, pos - start), start});
      } else if (c == '\'' || c == '"') {
        tokens_.push_back({Tok::String, lex_string(pos), start});
      } else {
        static const char* two[] = {"**", "//", "==", "!=", "<=", ">="};
        std::string op;
        for (const char* t : two)
          if (src_.compare(pos, 2, t) == 0) op = t;
        if (op.empty()) {
          if (std::string("+-*/%~<>()[]{},.:|=").find(c) == std::string::npos)
            fail(src_, pos, std::string("unexpected character '") + c + "'");
          op = std::string(1, c);
        }
        if (op == "(" || op == "[" || op == "{") depth++;
        if (op == ")" || op == "]" || op == "}") depth--;
        pos += op.size();
        tokens_.push_back({Tok::Op, op, start});
      }
    }
  }

  // A quoted string literal, decoded as Jinja does (Python's unicode-escape); returns the text.
  std::string lex_string(size_t& pos) {
    char quote = src_[pos];
    size_t start = pos++;
    std::string out;
    while (pos < src_.size() && src_[pos] != quote) {
      char c = src_[pos++];
      if (c != '\\' || pos >= src_.size()) {
        out += c;
        continue;
      }
      size_t escape_pos = pos - 1;
      char e = src_[pos++];
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case '\n': break;  // backslash-newline continues the literal
        case 'x': append_utf8(out, hex_escape(pos, 2, escape_pos)); break;
        case 'u': append_utf8(out, hex_escape(pos, 4, escape_pos)); break;
        case 'U': append_utf8(out, hex_escape(pos, 8, escape_pos)); break;
        case 'N': fail(src_, escape_pos, "unsupported construct: \\N{...} escape");
        default:
          if (e >= '0' && e <= '7') {  // up to three octal digits
            uint32_t code = e - '0';
            for (int i = 0; i < 2 && pos < src_.size() && src_[pos] >= '0' && src_[pos] <= '7'; i++)
              code = code * 8 + (src_[pos++] - '0');
            append_utf8(out, code);
          } else {  // Python keeps unknown escapes verbatim
            out += '\\';
            out += e;
          }
      }
    }
    if (pos >= src_.size()) fail(src_, start, "unterminated string literal");
    pos++;
    return out;
  }

  uint32_t hex_escape(size_t& pos, int digits, size_t escape_pos) {
    uint32_t code = 0;
    for (int i = 0; i < digits; i++, pos++) {
      char h = pos < src_.size() ? src_[pos] : '\0';
      if (!std::isxdigit(static_cast<unsigned char>(h))) fail(src_, escape_pos, "truncated \\x/\\u escape");
      code = code * 16 + (std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
    }
    if (code > 0x10FFFF) fail(src_, escape_pos, "escape is not a Unicode code point");
    return code;
  }

  static void append_utf8(std::string& out, uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }
};

// ------------------------------------------------------------------------------------------ AST

struct Expr {
  enum class Kind {
    Literal, Name, List, Dict, Attr, Index, Slice, Neg, Not, And, Or, Binary, Compare, Ternary, Call, Filter, Test
  };
  Kind kind;
  size_t pos;
  Value literal;                  // Literal
  std::string name;               // Name; Attr member; Filter/Test name; Binary operator
  std::vector<std::string> ops;   // Compare: one operator per operand after the first
  // Operands. Call/Filter/Test: args[0] is the callee or input, the rest are call arguments.
  // Slice: object, start, stop, step (absent bounds are null). Ternary: value, condition, else (may be null).
  // Dict: key, value, key, value, ...
  std::vector<std::unique_ptr<Expr>> args;
  std::vector<std::string> kwarg_names;  // Call/Filter/Test: per call argument, "" when positional
  bool negated = false;                  // Test: `is not`
};
using ExprPtr = std::unique_ptr<Expr>;

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class Kind { Text, Output, If, For, Set, SetBlock, Macro, Break, Continue };
  Kind kind;
  size_t pos;
  std::string text;                 // Text
  ExprPtr expr;                     // Output value; For iterable; Set value
  ExprPtr filter;                   // For: the `if` clause, may be null
  std::vector<ExprPtr> conditions;  // If: one per if/elif branch
  // If: one body per condition, plus the else body if any. For: loop body, plus the else body if any.
  // SetBlock: the captured body.
  std::vector<Body> bodies;
  std::vector<std::string> targets;  // For loop variables; Set names (unpacked when several); Macro parameters
  std::vector<ExprPtr> defaults;     // Macro: one per parameter, null when it has none
  std::string attr;                  // Set: `ns.attr` assignment when non-empty; Macro: its name
};

}  // namespace afm::jinja

namespace afm {

struct ChatTemplate::Program {
  std::string source;
  jinja::Body body;
};

}  // namespace afm

namespace afm::jinja {

// ------------------------------------------------------------------------------------------ parser

class Parser {
 public:
  Parser(const std::string& src, std::vector<Token> tokens) : src_(src), toks_(std::move(tokens)) {}

  Body parse_template() {
    Body body;
    parse_body(body, {}, "", 0);
    return body;
  }

 private:
  const std::string& src_;
  std::vector<Token> toks_;
  size_t i_ = 0;
  int loop_depth_ = 0;  // break/continue are only valid inside a for body
  int depth_ = 0;       // nesting of blocks and expressions, which the renderer walks recursively

  // Each parse function that nests counts its levels with deeper() and gives them back on return.
  struct DepthGuard {
    int& depth;
    int saved;
    ~DepthGuard() { depth = saved; }
  };
  DepthGuard guard() { return DepthGuard{depth_, depth_}; }
  void deeper(size_t pos) {
    if (++depth_ > kMaxNesting) fail(src_, pos, "blocks or expressions nested deeper than 256 levels");
  }

  const Token& peek(size_t ahead = 0) const { return toks_[std::min(i_ + ahead, toks_.size() - 1)]; }
  Value number(const Token& t) const {
    try {
      return t.kind == Tok::Int ? make_int(std::stoll(t.text)) : make_float(std::stod(t.text));
    } catch (const std::exception&) {
      fail(src_, t.pos, "number literal out of range");
    }
  }
  const Token& next() { return toks_[i_ < toks_.size() - 1 ? i_++ : i_]; }
  bool is_op(const char* op, size_t ahead = 0) const { return peek(ahead).kind == Tok::Op && peek(ahead).text == op; }
  bool is_name(const char* name, size_t ahead = 0) const {
    return peek(ahead).kind == Tok::Name && peek(ahead).text == name;
  }

  static std::string describe(const Token& t) {
    switch (t.kind) {
      case Tok::VarEnd: return "end of '{{ }}'";
      case Tok::BlockEnd: return "end of tag";
      case Tok::Eof: return "end of template";
      case Tok::String: return "string literal";
      default: return "'" + t.text + "'";
    }
  }
  [[noreturn]] void unexpected(const char* expected) {
    fail(src_, peek().pos, std::string("expected ") + expected + ", got " + describe(peek()));
  }
  void expect_op(const char* op) {
    if (!is_op(op)) unexpected((std::string("'") + op + "'").c_str());
    next();
  }
  std::string expect_name() {
    if (peek().kind != Tok::Name) unexpected("a name");
    return next().text;
  }
  void expect_block_end() {
    if (peek().kind != Tok::BlockEnd) unexpected("end of tag '%}'");
    next();
  }

  // Appends nodes to `body` until a block tag named in `ends` opens; returns that name with the
  // stream just past it. `opener`/`opener_pos` name the enclosing block for the unclosed error.
  std::string parse_body(Body& body, std::initializer_list<const char*> ends, const std::string& opener,
                         size_t opener_pos) {
    auto nesting = guard();
    deeper(opener_pos);
    for (;;) {
      const Token& t = peek();
      if (t.kind == Tok::Eof) {
        if (ends.size() == 0) return "";
        fail(src_, opener_pos, "unclosed '" + opener + "' block: expected '" + *(ends.end() - 1) + "'");
      }
      if (t.kind == Tok::Text) {
        auto node = new_node(Node::Kind::Text, t.pos);
        node->text = next().text;
        body.push_back(std::move(node));
        continue;
      }
      if (t.kind == Tok::VarBegin) {
        auto node = new_node(Node::Kind::Output, t.pos);
        next();
        node->expr = parse_expr();
        if (peek().kind != Tok::VarEnd) unexpected("end of '{{ }}'");
        next();
        body.push_back(std::move(node));
        continue;
      }
      size_t tag_pos = next().pos;  // BlockBegin
      if (peek().kind != Tok::Name) unexpected("a tag name");
      std::string tag = next().text;
      for (const char* end : ends)
        if (tag == end) return tag;
      if (tag == "if") {
        body.push_back(parse_if(tag_pos));
      } else if (tag == "for") {
        body.push_back(parse_for(tag_pos));
      } else if (tag == "set") {
        body.push_back(parse_set(tag_pos));
      } else if (tag == "macro") {
        body.push_back(parse_macro(tag_pos));
      } else if (tag == "generation") {
        // HF's assistant-mask marker: renders its body unchanged.
        expect_block_end();
        parse_body(body, {"endgeneration"}, "generation", tag_pos);
        expect_block_end();
      } else if (tag == "break" || tag == "continue") {
        if (loop_depth_ == 0) fail(src_, tag_pos, "'" + tag + "' outside of a for loop");
        expect_block_end();
        body.push_back(new_node(tag == "break" ? Node::Kind::Break : Node::Kind::Continue, tag_pos));
      } else if (tag == "elif" || tag == "else" || tag == "endif" || tag == "endfor" || tag == "endset" ||
                 tag == "endgeneration" || tag == "endmacro") {
        fail(src_, tag_pos, "unexpected '" + tag + "'" + (opener.empty() ? "" : " inside '" + opener + "' block"));
      } else {
        fail(src_, tag_pos, "unknown or unsupported tag '" + tag + "'");
      }
    }
  }

  std::unique_ptr<Node> parse_if(size_t tag_pos) {
    auto node = new_node(Node::Kind::If, tag_pos);
    ExprPtr cond = parse_expr();
    expect_block_end();
    for (;;) {
      Body body;
      std::string end = parse_body(body, {"elif", "else", "endif"}, "if", tag_pos);
      node->conditions.push_back(std::move(cond));
      node->bodies.push_back(std::move(body));
      if (end == "elif") {
        cond = parse_expr();
        expect_block_end();
        continue;
      }
      expect_block_end();
      if (end == "else") {
        Body else_body;
        parse_body(else_body, {"endif"}, "if", tag_pos);
        expect_block_end();
        node->bodies.push_back(std::move(else_body));
      }
      return node;
    }
  }

  std::unique_ptr<Node> parse_for(size_t tag_pos) {
    auto node = new_node(Node::Kind::For, tag_pos);
    node->targets.push_back(expect_name());
    while (is_op(",")) {
      next();
      node->targets.push_back(expect_name());
    }
    if (!is_name("in")) unexpected("'in'");
    next();
    node->expr = parse_or();  // no conditional expression here: `if` starts the loop filter
    if (is_name("if")) {
      next();
      node->filter = parse_expr();
    }
    if (is_name("recursive")) fail(src_, peek().pos, "unsupported construct 'recursive' loop");
    expect_block_end();
    Body body;
    loop_depth_++;
    std::string end = parse_body(body, {"else", "endfor"}, "for", tag_pos);
    loop_depth_--;
    expect_block_end();
    node->bodies.push_back(std::move(body));
    if (end == "else") {
      Body else_body;
      parse_body(else_body, {"endfor"}, "for", tag_pos);
      expect_block_end();
      node->bodies.push_back(std::move(else_body));
    }
    return node;
  }

  std::unique_ptr<Node> parse_set(size_t tag_pos) {
    auto node = new_node(Node::Kind::Set, tag_pos);
    node->targets.push_back(expect_name());
    if (is_op(".")) {
      next();
      node->attr = expect_name();
    } else {
      while (is_op(",")) {
        next();
        node->targets.push_back(expect_name());
      }
    }
    if (is_op("=")) {
      next();
      node->expr = parse_expr();
      expect_block_end();
      return node;
    }
    if (peek().kind != Tok::BlockEnd) unexpected("'=' or end of tag");
    next();
    node->kind = Node::Kind::SetBlock;
    Body body;
    parse_body(body, {"endset"}, "set", tag_pos);
    expect_block_end();
    node->bodies.push_back(std::move(body));
    return node;
  }

  // {% macro name(a, b='default') %}body{% endmacro %}
  std::unique_ptr<Node> parse_macro(size_t tag_pos) {
    auto node = new_node(Node::Kind::Macro, tag_pos);
    node->attr = expect_name();
    expect_op("(");
    while (!is_op(")")) {
      node->targets.push_back(expect_name());
      if (is_op("=")) {
        next();
        node->defaults.push_back(parse_expr());
      } else {
        if (!node->defaults.empty() && node->defaults.back())
          fail(src_, peek().pos, "macro parameter without a default after one with a default");
        node->defaults.push_back(nullptr);
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
    expect_block_end();
    int enclosing_loops = loop_depth_;  // a macro body is not inside the caller's loop
    loop_depth_ = 0;
    Body body;
    parse_body(body, {"endmacro"}, "macro", tag_pos);
    loop_depth_ = enclosing_loops;
    expect_block_end();
    node->bodies.push_back(std::move(body));
    return node;
  }

  // ---- expressions, lowest precedence first (Jinja2's grammar)

  static ExprPtr make(Expr::Kind kind, size_t pos) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->pos = pos;
    return e;
  }
  static std::unique_ptr<Node> new_node(Node::Kind kind, size_t pos) {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    n->pos = pos;
    return n;
  }

  ExprPtr parse_expr() {
    auto nesting = guard();
    deeper(peek().pos);
    ExprPtr value = parse_or();
    while (is_name("if")) {
      deeper(peek().pos);
      auto t = make(Expr::Kind::Ternary, next().pos);
      t->args.push_back(std::move(value));
      t->args.push_back(parse_or());
      if (is_name("else")) {
        next();
        t->args.push_back(parse_expr());
      } else {
        t->args.push_back(nullptr);  // a missing else yields undefined
      }
      value = std::move(t);
    }
    return value;
  }

  ExprPtr parse_or() {
    auto nesting = guard();
    ExprPtr left = parse_and();
    while (is_name("or")) {
      deeper(peek().pos);
      auto e = make(Expr::Kind::Or, next().pos);
      e->args.push_back(std::move(left));
      e->args.push_back(parse_and());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr parse_and() {
    auto nesting = guard();
    ExprPtr left = parse_not();
    while (is_name("and")) {
      deeper(peek().pos);
      auto e = make(Expr::Kind::And, next().pos);
      e->args.push_back(std::move(left));
      e->args.push_back(parse_not());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr parse_not() {
    auto nesting = guard();
    deeper(peek().pos);
    if (is_name("not")) {
      auto e = make(Expr::Kind::Not, next().pos);
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    ExprPtr first = parse_math1();
    ExprPtr cmp;
    for (;;) {
      std::string op;
      if (peek().kind == Tok::Op && (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
                                     peek().text == "<=" || peek().text == ">" || peek().text == ">=")) {
        op = peek().text;
        next();
      } else if (is_name("in")) {
        op = "in";
        next();
      } else if (is_name("not") && is_name("in", 1)) {
        op = "not in";
        next();
        next();
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::Kind::Compare, first->pos);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }

  ExprPtr binary_loop(ExprPtr (Parser::*operand)(), std::initializer_list<const char*> ops) {
    auto nesting = guard();
    ExprPtr left = (this->*operand)();
    for (;;) {
      const char* match = nullptr;
      for (const char* op : ops)
        if (is_op(op)) match = op;
      if (!match) return left;
      deeper(peek().pos);
      auto e = make(Expr::Kind::Binary, next().pos);
      e->name = match;
      e->args.push_back(std::move(left));
      e->args.push_back((this->*operand)());
      left = std::move(e);
    }
  }
  ExprPtr parse_math1() { return binary_loop(&Parser::parse_concat, {"+", "-"}); }
  ExprPtr parse_concat() { return binary_loop(&Parser::parse_math2, {"~"}); }
  ExprPtr parse_math2() { return binary_loop(&Parser::parse_pow, {"*", "/", "//", "%"}); }
  ExprPtr parse_pow() { return binary_loop(&Parser::parse_unary_filtered, {"**"}); }
  ExprPtr parse_unary_filtered() { return parse_unary(true); }

  // As in Jinja2, filters and tests bind tighter than any operator except member access and calls,
  // and `-x|f` is f(-x).
  ExprPtr parse_unary(bool with_filters) {
    auto nesting = guard();
    deeper(peek().pos);
    ExprPtr e;
    if (is_op("-")) {
      e = make(Expr::Kind::Neg, next().pos);
      e->args.push_back(parse_unary(false));
    } else if (is_op("+")) {
      next();
      e = parse_unary(false);
    } else {
      e = parse_postfix(parse_primary());
    }
    return with_filters ? parse_filters(std::move(e)) : std::move(e);
  }

  ExprPtr parse_primary() {
    const Token& t = peek();
    size_t pos = t.pos;
    switch (t.kind) {
      case Tok::Name: {
        std::string name = next().text;
        auto e = make(Expr::Kind::Literal, pos);
        if (name == "true" || name == "True") {
          e->literal = make_bool(true);
        } else if (name == "false" || name == "False") {
          e->literal = make_bool(false);
        } else if (name == "none" || name == "None") {
          e->literal = make_none();
        } else {
          e->kind = Expr::Kind::Name;
          e->name = name;
        }
        return e;
      }
      case Tok::String: {
        std::string s;
        while (peek().kind == Tok::String) s += next().text;  // adjacent literals concatenate
        auto e = make(Expr::Kind::Literal, pos);
        e->literal = make_string(std::move(s));
        return e;
      }
      case Tok::Int:
      case Tok::Float: {
        auto e = make(Expr::Kind::Literal, pos);
        e->literal = number(next());
        return e;
      }
      case Tok::Op:
        if (t.text == "(") {
          next();
          ExprPtr inner = parse_expr();
          if (is_op(",")) fail(src_, peek().pos, "unsupported construct: tuple literal");
          expect_op(")");
          return inner;
        }
        if (t.text == "[") {
          next();
          auto e = make(Expr::Kind::List, pos);
          while (!is_op("]")) {
            e->args.push_back(parse_expr());
            if (!is_op(",")) break;
            next();
          }
          expect_op("]");
          return e;
        }
        if (t.text == "{") {
          next();
          auto e = make(Expr::Kind::Dict, pos);
          while (!is_op("}")) {
            e->args.push_back(parse_expr());
            expect_op(":");
            e->args.push_back(parse_expr());
            if (!is_op(",")) break;
            next();
          }
          expect_op("}");
          return e;
        }
        break;
      default: break;
    }
    unexpected("an expression");
  }

  ExprPtr parse_postfix(ExprPtr e) {
    auto nesting = guard();
    for (;;) {
      deeper(peek().pos);
      if (is_op(".")) {
        size_t pos = next().pos;
        if (peek().kind == Tok::Int) {  // `x.0` is x[0] in Jinja
          auto idx = make(Expr::Kind::Index, pos);
          idx->args.push_back(std::move(e));
          auto lit = make(Expr::Kind::Literal, peek().pos);
          lit->literal = number(next());
          idx->args.push_back(std::move(lit));
          e = std::move(idx);
          continue;
        }
        auto attr = make(Expr::Kind::Attr, pos);
        attr->name = expect_name();
        attr->args.push_back(std::move(e));
        e = std::move(attr);
      } else if (is_op("[")) {
        size_t pos = next().pos;
        ExprPtr parts[3];
        int colons = 0;
        for (;;) {
          if (!is_op(":") && !is_op("]")) parts[colons] = parse_expr();
          if (colons < 2 && is_op(":")) {
            next();
            colons++;
            continue;
          }
          break;
        }
        expect_op("]");
        if (colons == 0 && !parts[0]) fail(src_, pos, "empty subscript");
        auto sub = make(colons == 0 ? Expr::Kind::Index : Expr::Kind::Slice, pos);
        sub->args.push_back(std::move(e));
        sub->args.push_back(std::move(parts[0]));
        if (colons > 0) {
          sub->args.push_back(std::move(parts[1]));
          sub->args.push_back(std::move(parts[2]));
        }
        e = std::move(sub);
      } else if (is_op("(")) {
        auto call = make(Expr::Kind::Call, peek().pos);
        call->args.push_back(std::move(e));
        parse_call_args(*call);
        e = std::move(call);
      } else {
        return e;
      }
    }
  }

  // `(a, b, key=value)`, appended to e.args / e.kwarg_names.
  void parse_call_args(Expr& e) {
    expect_op("(");
    while (!is_op(")")) {
      if (peek().kind == Tok::Name && is_op("=", 1)) {
        e.kwarg_names.push_back(next().text);
        next();
      } else {
        if (std::any_of(e.kwarg_names.begin(), e.kwarg_names.end(), [](const std::string& n) { return !n.empty(); }))
          fail(src_, peek().pos, "positional argument after keyword argument");
        e.kwarg_names.emplace_back();
      }
      e.args.push_back(parse_expr());
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
  }

  ExprPtr parse_filters(ExprPtr e) {
    auto nesting = guard();
    for (;;) {
      deeper(peek().pos);
      if (is_op("|")) {
        auto f = make(Expr::Kind::Filter, next().pos);
        f->name = expect_name();
        f->args.push_back(std::move(e));
        if (is_op("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (is_name("is")) {
        auto t = make(Expr::Kind::Test, next().pos);
        if (is_name("not")) {
          next();
          t->negated = true;
        }
        t->name = expect_name();
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_call_args(*t);
        } else if (starts_test_argument()) {  // `x is divisibleby 3`, `x is sameas none`
          t->kwarg_names.emplace_back();
          t->args.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
        if (is_name("is")) fail(src_, peek().pos, "tests cannot be chained with 'is'");
      } else {
        return e;
      }
    }
  }

  bool starts_test_argument() const {
    const Token& t = peek();
    if (t.kind == Tok::String || t.kind == Tok::Int || t.kind == Tok::Float) return true;
    if (t.kind == Tok::Op) return t.text == "[" || t.text == "{";
    if (t.kind != Tok::Name) return false;
    for (const char* kw : {"and", "or", "if", "else", "not", "in", "is"})
      if (t.text == kw) return false;
    return true;
  }
};

// ------------------------------------------------------------------------------------------ evaluator

// Evaluated call arguments: positional ones have an empty name.
struct Args {
  std::vector<Value> values;
  std::vector<std::string> names;

  // Rejects arguments the callee does not take, so a misspelt keyword cannot be silently ignored.
  void check(std::initializer_list<const char*> params, const std::string& callee, const std::string& src,
             size_t pos) const {
    size_t positional = 0;
    for (const std::string& n : names) {
      if (n.empty()) {
        positional++;
        continue;
      }
      if (std::none_of(params.begin(), params.end(), [&](const char* p) { return n == p; }))
        fail(src, pos, callee + "() got an unexpected keyword argument '" + n + "'");
    }
    if (positional > params.size())
      fail(src, pos, callee + "() takes at most " + std::to_string(params.size()) + " arguments");
  }
  // The parameter at `index` (passed positionally) or `name` (by keyword); null when absent.
  const Value* get(size_t index, const char* name) const {
    size_t positional = 0;
    for (size_t i = 0; i < values.size(); i++) {
      if (names[i].empty() ? positional++ == index : names[i] == name) return &values[i];
    }
    return nullptr;
  }
};

enum class Flow { Normal, Break, Continue };

class Renderer {
 public:
  Renderer(const std::string& src, std::unordered_map<std::string, Value> globals) : src_(src) {
    scopes_.push_back(std::move(globals));
  }

  Flow exec(const Body& body, std::string& out) {
    for (const auto& node : body) {
      Flow flow = exec(*node, out);
      if (flow != Flow::Normal) return flow;
    }
    return Flow::Normal;
  }

 private:
  const std::string& src_;
  // Innermost last. Each for-loop iteration gets a fresh scope, so `set` inside a loop does not
  // leak out of it (or into the next iteration) — the reason templates need namespace().
  std::vector<std::unordered_map<std::string, Value>> scopes_;
  int64_t steps_ = 0;
  size_t built_ = 0;
  int call_depth_ = 0;

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto found = it->find(name);
      if (found != it->end()) return found->second;
    }
    return make_undefined(name);
  }

  void assign(const std::vector<std::string>& targets, const Value& value, size_t pos) {
    if (targets.size() == 1) {
      scopes_.back()[targets[0]] = value;
      return;
    }
    if (value.kind != Kind::List || value.list->size() != targets.size())
      fail(src_, pos, "cannot unpack " + a_kind(value) + " into " + std::to_string(targets.size()) + " names");
    for (size_t i = 0; i < targets.size(); i++) scopes_.back()[targets[i]] = (*value.list)[i];
  }

  [[noreturn]] void undefined_error(const Value& v, size_t pos) {
    fail(src_, pos, "'" + v.str + "' is undefined");
  }

  Flow exec(const Node& node, std::string& out) {
    switch (node.kind) {
      case Node::Kind::Text: out += node.text; break;
      case Node::Kind::Output: out += py_str(eval(*node.expr)); break;
      case Node::Kind::If:
        for (size_t b = 0; b < node.bodies.size(); b++) {
          if (b == node.conditions.size() || truthy(eval(*node.conditions[b]))) return exec(node.bodies[b], out);
        }
        break;
      case Node::Kind::For: return exec_for(node, out);
      case Node::Kind::Set: {
        Value value = eval(*node.expr);
        if (node.attr.empty()) {
          assign(node.targets, value, node.pos);
        } else {
          set_attribute(node, std::move(value));
        }
        break;
      }
      case Node::Kind::SetBlock: {
        std::string captured;
        exec(node.bodies[0], captured);
        if (node.attr.empty()) {
          assign(node.targets, make_string(std::move(captured)), node.pos);
        } else {
          set_attribute(node, make_string(std::move(captured)));
        }
        break;
      }
      case Node::Kind::Macro: {
        Value macro = make_function(node.attr);
        macro.macro = &node;
        macro.macro_scopes = scopes_.size();
        scopes_.back()[node.attr] = std::move(macro);
        break;
      }
      case Node::Kind::Break: return Flow::Break;
      case Node::Kind::Continue: return Flow::Continue;
    }
    if (out.size() > kMaxSize) fail(src_, node.pos, "the rendered prompt is larger than 64 MiB");
    return Flow::Normal;
  }

  // Counts loop iterations, macro calls and evaluations, so no template can run for ever.
  void step(size_t pos) {
    if (++steps_ > kMaxSteps) fail(src_, pos, "the template runs too long (over 500000 steps)");
  }

  // A macro runs in a new scope over the scopes open where it was defined: it sees the template's
  // variables, not its caller's loop variables. Missing arguments are undefined, as in Jinja.
  Value call_macro(const Value& f, const Args& args, size_t pos) {
    const Node& m = *f.macro;
    if (call_depth_ >= kMaxCallDepth) fail(src_, pos, "macro '" + m.attr + "' recurses too deeply");
    step(pos);
    std::unordered_map<std::string, Value> locals;
    size_t positional = 0;
    for (size_t i = 0; i < args.values.size(); i++) {
      if (args.names[i].empty()) {
        if (positional >= m.targets.size())
          fail(src_, pos, "macro '" + m.attr + "' takes at most " + std::to_string(m.targets.size()) + " arguments");
        locals[m.targets[positional++]] = args.values[i];
      } else if (std::find(m.targets.begin(), m.targets.end(), args.names[i]) != m.targets.end()) {
        locals[args.names[i]] = args.values[i];
      } else {
        fail(src_, pos, "macro '" + m.attr + "' has no parameter '" + args.names[i] + "'");
      }
    }
    for (size_t i = 0; i < m.targets.size(); i++) {
      if (locals.count(m.targets[i])) continue;
      locals[m.targets[i]] = m.defaults[i] ? eval(*m.defaults[i]) : make_undefined(m.targets[i]);
    }
    std::vector<std::unordered_map<std::string, Value>> callers(scopes_.begin() + f.macro_scopes, scopes_.end());
    scopes_.resize(f.macro_scopes);
    scopes_.push_back(std::move(locals));
    call_depth_++;
    std::string out;
    exec(m.bodies[0], out);
    call_depth_--;
    scopes_.pop_back();
    scopes_.insert(scopes_.end(), std::make_move_iterator(callers.begin()), std::make_move_iterator(callers.end()));
    return make_string(std::move(out));
  }

  void set_attribute(const Node& node, Value value) {
    Value target = lookup(node.targets[0]);
    if (target.kind != Kind::Dict || !target.is_namespace)
      fail(src_, node.pos, "cannot set attribute '" + node.attr + "' on " + a_kind(target) + " '" + node.targets[0] +
                               "': only namespace() objects are assignable");
    target.dict->set(node.attr, std::move(value));
  }

  std::vector<Value> iterate(const Value& v, size_t pos) {
    switch (v.kind) {
      case Kind::Undefined: return {};  // Jinja iterates an undefined value as empty
      case Kind::List:
        if (v.is_generator) return std::exchange(*v.list, {});
        return *v.list;
      case Kind::Dict: {
        std::vector<Value> keys;
        for (const auto& entry : v.dict->entries) keys.push_back(make_string(entry.first));
        return keys;
      }
      case Kind::String: {
        check_items(size_t(std::count_if(v.str.begin(), v.str.end(), [](char c) { return (c & 0xC0) != 0x80; })), pos);
        std::vector<Value> chars;
        std::vector<size_t> starts = char_starts(v.str);
        for (size_t i = 0; i + 1 < starts.size(); i++)
          chars.push_back(make_string(v.str.substr(starts[i], starts[i + 1] - starts[i])));
        return chars;
      }
      default: fail(src_, pos, "cannot iterate over " + a_kind(v));
    }
  }

  Flow exec_for(const Node& node, std::string& out) {
    std::vector<Value> items = iterate(eval(*node.expr), node.expr->pos);
    scopes_.emplace_back();
    if (node.filter) {  // the filter runs first, so loop.length and loop.index count kept items only
      std::vector<Value> kept;
      for (Value& item : items) {
        scopes_.back().clear();
        assign(node.targets, item, node.pos);
        if (truthy(eval(*node.filter))) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    int64_t n = static_cast<int64_t>(items.size());
    Value loop = make_dict();  // one object, updated in place each iteration, as Jinja's LoopContext is
    for (int64_t i = 0; i < n; i++) {
      step(node.pos);
      scopes_.back().clear();
      assign(node.targets, items[i], node.pos);
      loop.dict->set("index0", make_int(i));
      loop.dict->set("index", make_int(i + 1));
      loop.dict->set("revindex0", make_int(n - 1 - i));
      loop.dict->set("revindex", make_int(n - i));
      loop.dict->set("first", make_bool(i == 0));
      loop.dict->set("last", make_bool(i == n - 1));
      loop.dict->set("length", make_int(n));
      loop.dict->set("previtem", i > 0 ? items[i - 1] : make_undefined("loop.previtem"));
      loop.dict->set("nextitem", i + 1 < n ? items[i + 1] : make_undefined("loop.nextitem"));
      scopes_.back()["loop"] = loop;
      if (exec(node.bodies[0], out) == Flow::Break) break;
    }
    scopes_.pop_back();
    if (items.empty() && node.bodies.size() > 1) return exec(node.bodies[1], out);
    return Flow::Normal;
  }

  Args eval_args(const Expr& e) {
    Args args;
    for (size_t i = 1; i < e.args.size(); i++) {
      args.values.push_back(eval(*e.args[i]));
      args.names.push_back(e.kwarg_names[i - 1]);
    }
    return args;
  }

  // Each evaluation is a step, and its value is charged to kMaxBuilt by its size: a string's bytes
  // (evaluating one copies it) and a new list's items. So neither a long loop body nor a loop that
  // copies or grows a large value can run for hours or exhaust memory.
  Value eval(const Expr& e) {
    step(e.pos);
    Value v = evaluate(e);
    if (v.kind == Kind::String) built_ += v.str.size();
    if (v.kind == Kind::List && v.list.use_count() == 1) built_ += v.list->size() * sizeof(Value);
    if (built_ > kMaxBuilt) fail(src_, e.pos, "the template builds more than 512 MiB of values");
    return v;
  }

  Value evaluate(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::Literal: return e.literal;
      case Expr::Kind::Name: return lookup(e.name);
      case Expr::Kind::List: {
        std::vector<Value> items;
        for (const auto& a : e.args) items.push_back(eval(*a));
        return make_list(std::move(items));
      }
      case Expr::Kind::Dict: {
        Value d = make_dict();
        for (size_t i = 0; i < e.args.size(); i += 2) {
          Value key = eval(*e.args[i]);
          if (key.kind != Kind::String) fail(src_, e.args[i]->pos, "dict keys must be strings");
          d.dict->set(key.str, eval(*e.args[i + 1]));
        }
        return d;
      }
      case Expr::Kind::Attr: {
        // As Python's getattr comes first in Jinja, `d.items` is the method even when d has a key "items".
        Value obj = eval(*e.args[0]);
        if (obj.kind == Kind::Dict && !obj.is_namespace &&
            (e.name == "items" || e.name == "keys" || e.name == "values" || e.name == "get"))
          return make_function("dict." + e.name);
        return get_item(obj, make_string(e.name), e.pos);
      }
      case Expr::Kind::Index: return get_item(eval(*e.args[0]), eval(*e.args[1]), e.pos);
      case Expr::Kind::Slice: return slice(e);
      case Expr::Kind::Neg: {
        Value v = eval(*e.args[0]);
        if (v.kind == Kind::Int && v.integer == INT64_MIN) integer_overflow(e.pos);
        if (v.kind == Kind::Int) return make_int(-v.integer);
        if (v.kind == Kind::Float) return make_float(-v.number);
        if (v.kind == Kind::Undefined) undefined_error(v, e.pos);
        fail(src_, e.pos, "cannot negate " + a_kind(v));
      }
      case Expr::Kind::Not: return make_bool(!truthy(eval(*e.args[0])));
      case Expr::Kind::And: {  // Python semantics: returns an operand, not a bool
        Value left = eval(*e.args[0]);
        return truthy(left) ? eval(*e.args[1]) : left;
      }
      case Expr::Kind::Or: {
        Value left = eval(*e.args[0]);
        return truthy(left) ? left : eval(*e.args[1]);
      }
      case Expr::Kind::Binary: return binary(e.name, eval(*e.args[0]), eval(*e.args[1]), e.pos);
      case Expr::Kind::Compare: {
        Value left = eval(*e.args[0]);
        for (size_t i = 0; i < e.ops.size(); i++) {  // chained like Python: a < b < c
          Value right = eval(*e.args[i + 1]);
          if (!compare(e.ops[i], left, right, e.args[i + 1]->pos)) return make_bool(false);
          left = std::move(right);
        }
        return make_bool(true);
      }
      case Expr::Kind::Ternary:
        if (truthy(eval(*e.args[1]))) return eval(*e.args[0]);
        return e.args[2] ? eval(*e.args[2]) : make_undefined("conditional expression without else");
      case Expr::Kind::Call: {
        const Expr& callee = *e.args[0];
        Args args = eval_args(e);
        if (callee.kind == Expr::Kind::Attr) return call_method(eval(*callee.args[0]), callee.name, args, e.pos);
        Value f = eval(callee);
        if (f.kind == Kind::Undefined) undefined_error(f, callee.pos);
        if (f.kind != Kind::Function) fail(src_, e.pos, a_kind(f) + " is not callable");
        if (f.macro) return call_macro(f, args, e.pos);
        return call_global(f.str, args, e.pos);
      }
      case Expr::Kind::Filter: return apply_filter(e.name, eval(*e.args[0]), eval_args(e), e.pos);
      case Expr::Kind::Test: {
        bool result = apply_test(e.name, eval(*e.args[0]), eval_args(e), e.pos);
        return make_bool(result != e.negated);
      }
    }
    fail(src_, e.pos, "unhandled expression");
  }

  // obj[key] and obj.key: Jinja answers undefined for a missing key or an out-of-range index.
  Value get_item(const Value& obj, const Value& key, size_t pos) {
    if (obj.kind == Kind::Undefined) undefined_error(obj, pos);
    if (obj.kind == Kind::Dict && key.kind == Kind::String) {
      const Value* found = obj.dict->find(key.str);
      return found ? *found : make_undefined(key.str);
    }
    if ((obj.kind == Kind::List || obj.kind == Kind::String) && key.kind == Kind::Int) {
      if (obj.kind == Kind::List) {
        int64_t n = static_cast<int64_t>(obj.list->size());
        int64_t i = key.integer < 0 ? key.integer + n : key.integer;
        return i >= 0 && i < n ? (*obj.list)[i] : make_undefined("index " + std::to_string(key.integer));
      }
      std::vector<size_t> starts = char_starts(obj.str);
      int64_t n = static_cast<int64_t>(starts.size()) - 1;
      int64_t i = key.integer < 0 ? key.integer + n : key.integer;
      if (i < 0 || i >= n) return make_undefined("index " + std::to_string(key.integer));
      return make_string(obj.str.substr(starts[i], starts[i + 1] - starts[i]));
    }
    return make_undefined(py_str(key));
  }

  Value slice(const Expr& e) {
    Value obj = eval(*e.args[0]);
    Value bounds[3];
    for (int b = 0; b < 3; b++) {
      if (!e.args[b + 1]) continue;
      bounds[b] = eval(*e.args[b + 1]);
      if (bounds[b].kind != Kind::Int && bounds[b].kind != Kind::None)
        fail(src_, e.args[b + 1]->pos, "slice bounds must be integers");
    }
    if (bounds[2].kind == Kind::Int && bounds[2].integer == 0) fail(src_, e.pos, "slice step cannot be zero");
    if (obj.kind == Kind::List) {
      std::vector<Value> items;
      for (int64_t i : slice_indices(static_cast<int64_t>(obj.list->size()), bounds[0], bounds[1], bounds[2]))
        items.push_back((*obj.list)[i]);
      return make_list(std::move(items));
    }
    if (obj.kind == Kind::String) {
      std::vector<size_t> starts = char_starts(obj.str);
      std::string out;
      for (int64_t i : slice_indices(static_cast<int64_t>(starts.size()) - 1, bounds[0], bounds[1], bounds[2]))
        out += obj.str.substr(starts[i], starts[i + 1] - starts[i]);
      return make_string(std::move(out));
    }
    if (obj.kind == Kind::Undefined) undefined_error(obj, e.pos);
    fail(src_, e.pos, "cannot slice " + a_kind(obj));
  }

  [[noreturn]] void operand_error(const std::string& op, const Value& a, const Value& b, size_t pos) {
    if (a.kind == Kind::Undefined) undefined_error(a, pos);
    if (b.kind == Kind::Undefined) undefined_error(b, pos);
    fail(src_, pos, "unsupported operand types for '" + op + "': " + kind_name(a) + " and " + kind_name(b));
  }

  // Strings and lists a template builds stay under kMaxSize and kMaxItems, checked before they are
  // built, so doubling one in a loop cannot exhaust memory.
  void check_size(size_t n, size_t pos) {
    if (n > kMaxSize) fail(src_, pos, "a value larger than 64 MiB");
  }
  void check_items(size_t n, size_t pos) {
    if (n > kMaxItems) fail(src_, pos, "a list of more than 500000 items");
  }

  // afm's integers are 64-bit where Python's are unbounded: a result outside that range is an error.
  [[noreturn]] void integer_overflow(size_t pos) { fail(src_, pos, "integer overflow (afm's integers are 64-bit)"); }

  Value binary(const std::string& op, const Value& a, const Value& b, size_t pos) {
    int64_t result;
    if (op == "~") {
      Value joined = make_string(py_str(a) + py_str(b));
      check_size(joined.str.size(), pos);
      return joined;
    }
    bool ints = a.kind == Kind::Int && b.kind == Kind::Int;
    bool nums = is_number(a) && is_number(b);
    if (op == "+") {
      if (ints && __builtin_add_overflow(a.integer, b.integer, &result)) integer_overflow(pos);
      if (ints) return make_int(result);
      if (nums) return make_float(as_double(a) + as_double(b));
      if (a.kind == Kind::String && b.kind == Kind::String) {
        check_size(a.str.size() + b.str.size(), pos);
        return make_string(a.str + b.str);
      }
      if (a.kind == Kind::List && b.kind == Kind::List) {
        check_items(a.list->size() + b.list->size(), pos);
        std::vector<Value> items = *a.list;
        items.insert(items.end(), b.list->begin(), b.list->end());
        return make_list(std::move(items));
      }
    } else if (op == "-") {
      if (ints && __builtin_sub_overflow(a.integer, b.integer, &result)) integer_overflow(pos);
      if (ints) return make_int(result);
      if (nums) return make_float(as_double(a) - as_double(b));
    } else if (op == "*") {
      if (ints && __builtin_mul_overflow(a.integer, b.integer, &result)) integer_overflow(pos);
      if (ints) return make_int(result);
      if (nums) return make_float(as_double(a) * as_double(b));
      const Value* seq = a.kind == Kind::Int ? &b : &a;
      const Value* count = a.kind == Kind::Int ? &a : &b;
      if (count->kind == Kind::Int && (seq->kind == Kind::String || seq->kind == Kind::List)) {
        const double n = std::clamp<double>(static_cast<double>(count->integer) *
                                                (seq->kind == Kind::String ? seq->str.size() : seq->list->size()),
                                            0, 2.0 * kMaxSize);
        seq->kind == Kind::String ? check_size(size_t(n), pos) : check_items(size_t(n), pos);
      }
      if (count->kind == Kind::Int && seq->kind == Kind::String) {
        std::string out;
        for (int64_t i = 0; i < count->integer; i++) out += seq->str;
        return make_string(std::move(out));
      }
      if (count->kind == Kind::Int && seq->kind == Kind::List) {
        std::vector<Value> items;
        for (int64_t i = 0; i < count->integer; i++) items.insert(items.end(), seq->list->begin(), seq->list->end());
        return make_list(std::move(items));
      }
    } else if (op == "/" || op == "//" || op == "%") {
      if (a.kind == Kind::String && op == "%")
        fail(src_, pos, "unsupported construct: printf-style '%' string formatting");
      if (nums) {
        if (as_double(b) == 0.0) fail(src_, pos, "division by zero");
        if (op == "/") return make_float(as_double(a) / as_double(b));
        if (ints) {  // Python floors, and the remainder takes the divisor's sign
          if (a.integer == INT64_MIN && b.integer == -1) {  // the quotient, 2^63, overflows; the remainder is 0
            if (op == "//") integer_overflow(pos);
            return make_int(0);
          }
          int64_t q = a.integer / b.integer, r = a.integer % b.integer;
          if (r != 0 && ((r < 0) != (b.integer < 0))) {
            q--;
            r += b.integer;
          }
          return make_int(op == "//" ? q : r);
        }
        double x = as_double(a), y = as_double(b);
        if (op == "//") return make_float(std::floor(x / y));
        double r = std::fmod(x, y);
        if (r != 0.0 && ((r < 0) != (y < 0))) r += y;
        return make_float(r);
      }
    } else if (op == "**") {
      if (ints && b.integer >= 0) {  // by squaring: as many steps as the exponent has bits
        int64_t r = 1, base = a.integer;
        bool overflow = false;
        for (int64_t e = b.integer; e > 0; e >>= 1) {
          if (e & 1) overflow |= __builtin_mul_overflow(r, base, &r);
          if (e > 1) overflow |= __builtin_mul_overflow(base, base, &base);
        }
        if (overflow) integer_overflow(pos);
        return make_int(r);
      }
      if (nums) {
        if (as_double(a) == 0.0 && as_double(b) < 0) fail(src_, pos, "zero raised to a negative power");
        return make_float(std::pow(as_double(a), as_double(b)));
      }
    }
    operand_error(op, a, b, pos);
  }

  bool contains(const Value& container, const Value& item, size_t pos) {
    switch (container.kind) {
      case Kind::String:
        if (item.kind != Kind::String) fail(src_, pos, "'in <string>' requires a string, not " + a_kind(item));
        return container.str.find(item.str) != std::string::npos;
      case Kind::List:
        return std::any_of(container.list->begin(), container.list->end(),
                           [&](const Value& v) { return values_equal(v, item); });
      case Kind::Dict: return item.kind == Kind::String && container.dict->find(item.str) != nullptr;
      case Kind::Undefined: return false;  // undefined iterates as empty
      default: fail(src_, pos, "'in' needs a string, list or dict, not " + a_kind(container));
    }
  }

  bool compare(const std::string& op, const Value& a, const Value& b, size_t pos) {
    if (op == "==") return values_equal(a, b);
    if (op == "!=") return !values_equal(a, b);
    if (op == "in") return contains(b, a, pos);
    if (op == "not in") return !contains(b, a, pos);
    int order;
    if (is_number(a) && is_number(b)) {
      double x = as_double(a), y = as_double(b);
      order = x < y ? -1 : x > y ? 1 : 0;
    } else if (a.kind == Kind::String && b.kind == Kind::String) {
      order = a.str.compare(b.str);
    } else {
      operand_error(op, a, b, pos);
    }
    if (op == "<") return order < 0;
    if (op == "<=") return order <= 0;
    if (op == ">") return order > 0;
    return order >= 0;
  }

  std::string need_string(const Value* v, const std::string& what, size_t pos) {
    if (!v || v->kind != Kind::String)
      fail(src_, pos, what + " expects a string argument, got " + (v ? kind_name(*v) : "nothing"));
    return v->str;
  }

  // ---- globals

  Value call_global(const std::string& name, const Args& args, size_t pos) {
    if (name == "raise_exception") {
      args.check({"message"}, name, src_, pos);
      const Value* msg = args.get(0, "message");
      throw Error("chat template raised an exception: " + (msg ? py_str(*msg) : std::string()));
    }
    if (name == "namespace") {
      Value ns = make_dict();
      ns.is_namespace = true;
      for (size_t i = 0; i < args.values.size(); i++) {
        if (!args.names[i].empty()) {
          ns.dict->set(args.names[i], args.values[i]);
        } else if (args.values[i].kind == Kind::Dict) {  // namespace({'a': 1})
          for (const auto& [k, v] : args.values[i].dict->entries) ns.dict->set(k, v);
        } else {
          fail(src_, pos, "namespace() takes keyword arguments or a dict");
        }
      }
      return ns;
    }
    if (name == "dict") {  // dict(mapping, key=value, ...)
      Value d = make_dict();
      for (size_t i = 0; i < args.values.size(); i++) {
        if (!args.names[i].empty()) {
          d.dict->set(args.names[i], args.values[i]);
        } else if (i == 0 && args.values[i].kind == Kind::Dict && !args.values[i].is_namespace) {
          for (const auto& [k, v] : args.values[i].dict->entries) d.dict->set(k, v);
        } else {
          fail(src_, pos, "dict() takes one mapping and keyword arguments");
        }
      }
      return d;
    }
    if (name == "range") {
      args.check({"start", "stop", "step"}, name, src_, pos);
      for (const Value& v : args.values)
        if (v.kind != Kind::Int) fail(src_, pos, "range() takes integer arguments");
      size_t n = args.values.size();
      if (n == 0) fail(src_, pos, "range() expects at least 1 argument");
      int64_t start = n > 1 ? args.values[0].integer : 0;
      int64_t stop = n > 1 ? args.values[1].integer : args.values[0].integer;
      int64_t step = n > 2 ? args.values[2].integer : 1;
      if (step == 0) fail(src_, pos, "range() step cannot be zero");
      // In 128 bits, so that no bound or step can overflow.
      const __int128 span = step > 0 ? __int128{stop} - start : __int128{start} - stop, stride = step > 0 ? step : -__int128{step};
      const __int128 count = span > 0 ? (span - 1) / stride + 1 : 0;
      check_items(size_t(std::min<__int128>(count, kMaxItems + 1)), pos);
      std::vector<Value> items;
      for (__int128 i = 0; i < count; i++) items.push_back(make_int(int64_t(start + i * step)));
      return make_list(std::move(items));
    }
    if (name == "strftime_now") {
      args.check({"format"}, name, src_, pos);
      std::string format = need_string(args.get(0, "format"), name, pos);
      std::time_t now = std::time(nullptr);
      std::tm local{};
      localtime_r(&now, &local);
      char buf[256];
      size_t len = std::strftime(buf, sizeof buf, format.c_str(), &local);
      return make_string(std::string(buf, len));
    }
    fail(src_, pos, "unknown function '" + name + "'");
  }

  // ---- methods on strings and dicts (Python's str/dict API, the parts templates use)

  Value call_method(const Value& obj, const std::string& name, const Args& args, size_t pos) {
    std::string what = std::string(kind_name(obj)) + "." + name;
    if (obj.kind == Kind::Undefined) undefined_error(obj, pos);
    if (obj.kind == Kind::String) {
      const std::string& s = obj.str;
      if (name == "strip" || name == "lstrip" || name == "rstrip") {
        args.check({"chars"}, what, src_, pos);
        const Value* chars = args.get(0, "chars");
        std::string set = chars && chars->kind != Kind::None ? need_string(chars, what, pos) : kWhitespace;
        return make_string(strip_chars(s, set, name != "rstrip", name != "lstrip"));
      }
      if (name == "startswith" || name == "endswith") {
        args.check({"prefix"}, what, src_, pos);
        std::string affix = need_string(args.get(0, "prefix"), what, pos);
        return make_bool(affix.size() <= s.size() &&
                         (name == "startswith" ? s.compare(0, affix.size(), affix) == 0
                                               : s.compare(s.size() - affix.size(), affix.size(), affix) == 0));
      }
      if (name == "split") {
        args.check({"sep", "maxsplit"}, what, src_, pos);
        const Value* sep = args.get(0, "sep");
        const Value* max = args.get(1, "maxsplit");
        int64_t maxsplit = max && max->kind == Kind::Int ? max->integer : -1;
        std::vector<Value> parts;
        if (!sep || sep->kind == Kind::None) {  // runs of whitespace, no empty parts
          size_t i = 0;
          for (;;) {
            while (i < s.size() && is_space(s[i])) i++;
            if (i >= s.size()) break;
            if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
              parts.push_back(make_string(strip_chars(s.substr(i), kWhitespace, false, true)));
              break;
            }
            size_t j = i;
            while (j < s.size() && !is_space(s[j])) j++;
            parts.push_back(make_string(s.substr(i, j - i)));
            check_items(parts.size(), pos);
            i = j;
          }
        } else {
          std::string delim = need_string(sep, what, pos);
          if (delim.empty()) fail(src_, pos, "split(): empty separator");
          size_t i = 0;
          for (;;) {
            size_t j = s.find(delim, i);
            if (j == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit)) {
              parts.push_back(make_string(s.substr(i)));
              break;
            }
            parts.push_back(make_string(s.substr(i, j - i)));
            check_items(parts.size(), pos);
            i = j + delim.size();
          }
        }
        return make_list(std::move(parts));
      }
      if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
        args.check({}, what, src_, pos);
        return apply_filter(name, obj, args, pos);
      }
      if (name == "replace") {
        args.check({"old", "new", "count"}, what, src_, pos);
        return apply_filter(name, obj, args, pos);
      }
      if (name == "join") {
        args.check({"iterable"}, what, src_, pos);
        const Value* items = args.get(0, "iterable");
        std::string out;
        bool first = true;
        for (const Value& item : iterate(items ? *items : Value{}, pos)) {
          if (!first) out += s;
          out += need_string(&item, what, pos);
          first = false;
        }
        return make_string(std::move(out));
      }
    }
    if (obj.kind == Kind::Dict && !obj.is_namespace) {
      if (name == "items" || name == "keys" || name == "values") {
        args.check({}, what, src_, pos);
        std::vector<Value> out;
        for (const auto& [k, v] : obj.dict->entries) {
          if (name == "items") out.push_back(make_list({make_string(k), v}));
          if (name == "keys") out.push_back(make_string(k));
          if (name == "values") out.push_back(v);
        }
        return make_list(std::move(out));
      }
      if (name == "get") {
        args.check({"key", "default"}, what, src_, pos);
        std::string key = need_string(args.get(0, "key"), what, pos);
        const Value* found = obj.dict->find(key);
        const Value* fallback = args.get(1, "default");
        return found ? *found : fallback ? *fallback : make_none();
      }
    }
    fail(src_, pos, "unknown method '" + name + "' on " + kind_name(obj));
  }

  // ---- filters

  Value apply_filter(const std::string& name, const Value& in, const Args& args, size_t pos) {
    const std::string what = "filter '" + name + "'";
    auto string_input = [&]() { return py_str(in); };  // str(undefined) is "", as in Jinja
    if (name == "trim") {
      args.check({"chars"}, name, src_, pos);
      const Value* chars = args.get(0, "chars");
      std::string set = chars && chars->kind != Kind::None ? need_string(chars, what, pos) : kWhitespace;
      return make_string(strip_chars(string_input(), set, true, true));
    }
    if (name == "length" || name == "count") {
      args.check({}, name, src_, pos);
      switch (in.kind) {
        case Kind::Undefined: return make_int(0);
        case Kind::String: return make_int(static_cast<int64_t>(char_starts(in.str).size()) - 1);
        case Kind::List:
          if (in.is_generator) fail(src_, pos, "a generator (from map, select, ...) has no length: use |list first");
          return make_int(static_cast<int64_t>(in.list->size()));
        case Kind::Dict: return make_int(static_cast<int64_t>(in.dict->entries.size()));
        default: fail(src_, pos, a_kind(in) + " has no length");
      }
    }
    if (name == "upper" || name == "lower" || name == "capitalize" || name == "title") {
      args.check({}, name, src_, pos);
      // ASCII case mapping: non-ASCII letters pass through unchanged.
      std::string s = string_input();
      bool word_start = true;
      for (size_t i = 0; i < s.size(); i++) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        bool upper = name == "upper" || (name == "capitalize" && i == 0) || (name == "title" && word_start);
        s[i] = static_cast<char>(upper ? std::toupper(c) : std::tolower(c));
        word_start = !std::isalnum(c);
      }
      return make_string(std::move(s));
    }
    if (name == "default" || name == "d") {
      args.check({"default_value", "boolean"}, name, src_, pos);
      const Value* fallback = args.get(0, "default_value");
      const Value* boolean = args.get(1, "boolean");
      bool use_fallback = in.kind == Kind::Undefined || (boolean && truthy(*boolean) && !truthy(in));
      return use_fallback ? (fallback ? *fallback : make_string("")) : in;
    }
    if (name == "tojson") {  // HF's tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
      args.check({"ensure_ascii", "indent", "separators", "sort_keys"}, name, src_, pos);
      if (args.get(2, "separators")) fail(src_, pos, "unsupported construct: tojson(separators=...)");
      const Value* indent = args.get(1, "indent");
      if (indent && indent->kind != Kind::Int && indent->kind != Kind::None)
        fail(src_, pos, "tojson indent must be an integer");
      JsonOptions options;
      options.indent = indent && indent->kind == Kind::Int ? static_cast<int>(std::max<int64_t>(indent->integer, 0)) : -1;
      options.ensure_ascii = args.get(0, "ensure_ascii") && truthy(*args.get(0, "ensure_ascii"));
      options.sort_keys = args.get(3, "sort_keys") && truthy(*args.get(3, "sort_keys"));
      std::string out;
      dump_json(in, options, 0, out, src_, pos);
      return make_string(std::move(out));
    }
    if (name == "string") {
      args.check({}, name, src_, pos);
      return make_string(py_str(in));
    }
    if (name == "first" || name == "last") {
      args.check({}, name, src_, pos);
      if (in.is_generator && name == "last") fail(src_, pos, "filter 'last' of a generator: use |list first");
      if (in.is_generator) {  // takes one item, as next() does
        if (in.list->empty()) return make_undefined("first of an empty sequence");
        Value item = in.list->front();
        in.list->erase(in.list->begin());
        return item;
      }
      std::vector<Value> items = iterate(in, pos);
      if (items.empty()) return make_undefined(name + " of an empty sequence");
      return name == "first" ? items.front() : items.back();
    }
    if (name == "join") {
      args.check({"d", "attribute"}, name, src_, pos);
      const Value* sep = args.get(0, "d");
      const Value* attribute = args.get(1, "attribute");
      std::string out;
      bool first = true;
      for (const Value& item : iterate(in, pos)) {
        if (!first) out += sep ? need_string(sep, what, pos) : "";
        out += py_str(attribute ? get_item(item, *attribute, pos) : item);
        first = false;
      }
      return make_string(std::move(out));
    }
    if (name == "replace") {
      args.check({"old", "new", "count"}, name, src_, pos);
      std::string s = string_input();
      std::string from = need_string(args.get(0, "old"), what, pos);
      std::string to = need_string(args.get(1, "new"), what, pos);
      const Value* count = args.get(2, "count");
      int64_t left = count && count->kind == Kind::Int ? count->integer : -1;
      std::string out;
      size_t i = 0;
      if (from.empty()) fail(src_, pos, "replace() with an empty search string is not supported");
      for (size_t j; left != 0 && (j = s.find(from, i)) != std::string::npos; left--) {
        out += s.substr(i, j - i) + to;
        check_size(out.size(), pos);
        i = j + from.size();
      }
      return make_string(out + s.substr(i));
    }
    if (name == "list") {
      args.check({}, name, src_, pos);
      return make_list(iterate(in, pos));
    }
    if (name == "reverse") {
      args.check({}, name, src_, pos);
      std::vector<Value> items = iterate(in, pos);
      std::reverse(items.begin(), items.end());
      if (in.kind != Kind::String) return make_list(std::move(items));
      std::string out;
      for (const Value& c : items) out += c.str;
      return make_string(std::move(out));
    }
    if (name == "items") {
      args.check({}, name, src_, pos);
      if (in.kind == Kind::Undefined) return make_list({});
      if (in.kind != Kind::Dict) fail(src_, pos, "filter 'items' expects a dict, got " + a_kind(in));
      return call_method(in, "items", args, pos);
    }
    if (name == "int" || name == "float") {
      args.check({"default"}, name, src_, pos);
      const Value* fallback = args.get(0, "default");
      if (in.kind == Kind::Undefined) undefined_error(in, pos);
      double d;
      if (is_number(in)) {
        d = as_double(in);
      } else if (in.kind == Kind::Bool) {
        d = in.boolean;
      } else {
        try {
          size_t used = 0;
          std::string s = strip_chars(py_str(in), kWhitespace, true, true);
          d = std::stod(s, &used);
          if (used != s.size()) throw std::invalid_argument(s);
        } catch (const std::exception&) {
          if (fallback) return *fallback;
          return name == "int" ? make_int(0) : make_float(0.0);
        }
      }
      if (name == "int") {
        if (in.kind == Kind::Int) return in;
        if (!(d >= -0x1p63 && d < 0x1p63)) integer_overflow(pos);  // NaN, infinite or past 64 bits
        return make_int(static_cast<int64_t>(d));
      }
      return make_float(d);
    }
    if (name == "abs") {
      args.check({}, name, src_, pos);
      if (in.kind == Kind::Int && in.integer == INT64_MIN) integer_overflow(pos);
      if (in.kind == Kind::Int) return make_int(in.integer < 0 ? -in.integer : in.integer);
      if (in.kind == Kind::Float) return make_float(std::fabs(in.number));
      fail(src_, pos, "filter 'abs' expects a number, got " + a_kind(in));
    }
    if (name == "safe") {  // HF renders without autoescape, so marking markup safe changes nothing
      args.check({}, name, src_, pos);
      return in;
    }
    if (name == "map") {
      // map(attribute='x', default=...) or map('filter', args...)
      const Value* attribute = nullptr;
      const Value* fallback = nullptr;
      Args rest;
      for (size_t i = 0; i < args.values.size(); i++) {
        if (args.names[i] == "attribute") {
          attribute = &args.values[i];
        } else if (args.names[i] == "default") {
          fallback = &args.values[i];
        } else if (i > 0 || !args.names[i].empty()) {
          rest.values.push_back(args.values[i]);
          rest.names.push_back(args.names[i]);
        }
      }
      std::vector<Value> out;
      for (const Value& item : iterate(in, pos)) {
        if (attribute) {
          Value v = get_item(item, *attribute, pos);
          out.push_back(v.kind == Kind::Undefined && fallback ? *fallback : v);
        } else {
          std::string filter = need_string(args.get(0, "filter"), what, pos);
          out.push_back(apply_filter(filter, item, rest, pos));
        }
      }
      return make_generator(std::move(out));
    }
    if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
      // selectattr('attr', 'test', arg...) keeps items whose attribute passes the test (truthiness
      // when no test is named); select/reject apply the test to the item itself.
      bool by_attr = name == "selectattr" || name == "rejectattr";
      bool keep_when = name == "selectattr" || name == "select";
      size_t first_test_arg = by_attr ? 1 : 0;
      for (const std::string& n : args.names)
        if (!n.empty()) fail(src_, pos, what + " does not take keyword arguments");
      if (by_attr && args.values.empty()) fail(src_, pos, what + " needs an attribute name");
      const Value* test = args.values.size() > first_test_arg ? &args.values[first_test_arg] : nullptr;
      std::string test_name = test ? need_string(test, what, pos) : "";
      Args test_args;
      for (size_t i = first_test_arg + 1; i < args.values.size(); i++) {
        test_args.values.push_back(args.values[i]);
        test_args.names.emplace_back();
      }
      std::vector<Value> out;
      for (const Value& item : iterate(in, pos)) {
        Value subject = by_attr ? get_item(item, args.values[0], pos) : item;
        bool pass = test ? apply_test(test_name, subject, test_args, pos) : truthy(subject);
        if (pass == keep_when) out.push_back(item);
      }
      return make_generator(std::move(out));
    }
    if (name == "indent") {  // indent(width=4, first=False, blank=False): every line after the first
      args.check({"width", "first", "blank"}, name, src_, pos);
      const Value* width = args.get(0, "width");
      std::string pad = !width ? "    "
                        : width->kind == Kind::String ? width->str
                        : width->kind == Kind::Int    ? std::string(static_cast<size_t>(std::clamp<int64_t>(width->integer, 0, 1024)), ' ')
                                                      : (fail(src_, pos, "indent width must be an integer or string"), "");
      bool first = args.get(1, "first") && truthy(*args.get(1, "first"));
      bool blank = args.get(2, "blank") && truthy(*args.get(2, "blank"));
      // Jinja appends a newline and splits it with str.splitlines, so a trailing newline is dropped.
      std::vector<std::string> lines = split_lines(string_input() + "\n");
      std::string out;
      for (size_t i = 0; i < lines.size(); i++) {
        if (i) out += "\n";
        if ((i > 0 || first) && (blank || !lines[i].empty())) out += pad;
        out += lines[i];
        check_size(out.size(), pos);
      }
      return make_string(std::move(out));
    }
    fail(src_, pos, "unknown filter '" + name + "'");
  }

  // ---- tests (`x is name`)

  bool apply_test(const std::string& name, const Value& v, const Args& args, size_t pos) {
    auto operand = [&]() -> const Value& {
      if (args.values.size() != 1) fail(src_, pos, "test '" + name + "' takes exactly one argument");
      return args.values[0];
    };
    if (name == "defined") return v.kind != Kind::Undefined;
    if (name == "undefined") return v.kind == Kind::Undefined;
    if (name == "none") return v.kind == Kind::None;
    if (name == "string") return v.kind == Kind::String;
    if (name == "number") return is_number(v) || v.kind == Kind::Bool;  // Python's bool is a number
    if (name == "integer") return v.kind == Kind::Int;
    if (name == "float") return v.kind == Kind::Float;
    if (name == "boolean") return v.kind == Kind::Bool;
    if (name == "true") return v.kind == Kind::Bool && v.boolean;
    if (name == "false") return v.kind == Kind::Bool && !v.boolean;
    if (name == "mapping") return v.kind == Kind::Dict;
    if (name == "sequence" || name == "iterable")  // undefined iterates as empty, so it counts
      return v.kind == Kind::List || v.kind == Kind::String || v.kind == Kind::Dict || v.kind == Kind::Undefined;
    if (name == "callable") return v.kind == Kind::Function;
    if (name == "odd" || name == "even" || name == "divisibleby") {
      int64_t divisor = name == "divisibleby" ? (operand().kind == Kind::Int ? operand().integer : 0) : 2;
      if (v.kind != Kind::Int || divisor == 0) fail(src_, pos, "test '" + name + "' needs integers");
      int64_t r = divisor == -1 ? 0 : v.integer % divisor;  // INT64_MIN % -1 overflows
      return name == "odd" ? r != 0 : r == 0;
    }
    if (name == "eq" || name == "equalto" || name == "==") return values_equal(v, operand());
    if (name == "ne" || name == "!=") return !values_equal(v, operand());
    if (name == "lt" || name == "lessthan" || name == "<") return compare("<", v, operand(), pos);
    if (name == "le" || name == "<=") return compare("<=", v, operand(), pos);
    if (name == "gt" || name == "greaterthan" || name == ">") return compare(">", v, operand(), pos);
    if (name == "ge" || name == ">=") return compare(">=", v, operand(), pos);
    if (name == "in") return contains(operand(), v, pos);
    fail(src_, pos, "unknown test '" + name + "'");
  }
};

}  // namespace afm::jinja

namespace afm {

ChatTemplate ChatTemplate::parse(const std::string& source) {
  // As Jinja2 does: normalize newlines, and drop a single trailing newline (keep_trailing_newline=False).
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); i++) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') i++;
    } else {
      src += source[i];
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();

  auto program = std::make_shared<Program>();
  program->source = std::move(src);
  jinja::Parser parser(program->source, jinja::Lexer(program->source).run());
  program->body = parser.parse_template();
  ChatTemplate t;
  t.program_ = std::move(program);
  return t;
}

ChatTemplate ChatTemplate::parse(const std::string& source, std::optional<std::string> bos_token,
                                 std::optional<std::string> eos_token) {
  ChatTemplate t = parse(source);
  t.bos_token_ = std::move(bos_token);
  t.eos_token_ = std::move(eos_token);
  return t;
}

ChatTemplate ChatTemplate::from_tokenizer_config(const std::string& path) {
  std::ifstream file(path);
  if (!file) throw Error("cannot open tokenizer config " + path);
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(file);
  } catch (const nlohmann::json::exception& e) {
    throw Error("invalid JSON in " + path + ": " + e.what());
  }
  std::string source;
  auto it = config.find("chat_template");
  if (it != config.end() && it->is_string()) {
    source = it->get<std::string>();
  } else if (it != config.end() && it->is_array()) {  // named templates: [{"name": ..., "template": ...}]
    for (const auto& entry : *it)
      if (entry.value("name", "") == "default") source = entry.value("template", "");
    if (source.empty()) throw Error(path + ": chat_template list has no entry named 'default'");
  } else {
    // Newer transformers save the template beside the config instead of inside it.
    std::filesystem::path jinja_path = std::filesystem::path(path).parent_path() / "chat_template.jinja";
    std::ifstream jinja_file(jinja_path);
    if (!jinja_file) throw Error(path + " has no chat_template (and there is no " + jinja_path.string() + ")");
    std::stringstream ss;
    ss << jinja_file.rdbuf();
    source = ss.str();
  }
  ChatTemplate t;
  try {
    t = parse(source);
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  // Special tokens are either strings or AddedToken objects {"content": "...", ...}.
  auto token = [&](const char* key) -> std::optional<std::string> {
    auto tok = config.find(key);
    if (tok == config.end() || tok->is_null()) return std::nullopt;
    if (tok->is_string()) return tok->get<std::string>();
    if (tok->is_object() && tok->contains("content") && (*tok)["content"].is_string())
      return (*tok)["content"].get<std::string>();
    throw Error(path + ": " + key + " must be a string or an object with a \"content\" string");
  };
  t.bos_token_ = token("bos_token");
  t.eos_token_ = token("eos_token");
  return t;
}

nlohmann::ordered_json chat_template_context(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                             bool add_generation_prompt) {
  nlohmann::ordered_json context;
  context["messages"] = nlohmann::ordered_json::array();
  for (const auto& message : messages) {
    // transformers copies a message's reasoning under every name templates read it by: `thinking`
    // first, the message's own keys, then `reasoning_content` (chat_template_utils._alias_reasoning_fields).
    nlohmann::ordered_json aliased = message;
    for (const char* key : {"reasoning_content", "thinking", "reasoning"}) {
      auto it = message.find(key);
      if (it == message.end() || it->is_null()) continue;
      aliased = {{"thinking", *it}};
      for (auto m = message.begin(); m != message.end(); ++m) aliased[m.key()] = m.value();
      aliased["reasoning_content"] = *it;
      break;
    }
    context["messages"].push_back(std::move(aliased));
  }
  // As apply_chat_template does: tools and documents are always passed, none when not given.
  context["tools"] = tools;
  context["documents"] = nullptr;
  context["add_generation_prompt"] = add_generation_prompt;
  return context;
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const ChatMessage& m : messages) list.push_back({{"role", m.role}, {"content", m.content}});
  return render(chat_template_context(list, nullptr, add_generation_prompt));
}

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  if (!program_) throw Error("chat template: render() on an empty ChatTemplate");
  if (!context.is_object()) throw Error("chat template: the render context must be a JSON object");
  std::unordered_map<std::string, jinja::Value> globals;
  for (const char* fn : {"raise_exception", "namespace", "range", "strftime_now", "dict"})
    globals[fn] = jinja::make_function(fn);
  if (bos_token_) globals["bos_token"] = jinja::make_string(*bos_token_);
  if (eos_token_) globals["eos_token"] = jinja::make_string(*eos_token_);
  for (auto it = context.begin(); it != context.end(); ++it) globals[it.key()] = jinja::from_json(it.value());
  jinja::Renderer renderer(program_->source, std::move(globals));
  std::string out;
  renderer.exec(program_->body, out);
  return out;
}

}  // namespace afm
