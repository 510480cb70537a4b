// A HuggingFace `tokenizer.json` tokenizer that reproduces HF `tokenizers` ids and text byte for byte.
//
// Supported (anything else in the file is refused with an afm::Error that names it):
//   model          BPE (merges as "a b" strings or ["a", "b"] pairs, ignore_merges, unk_token,
//                  fuse_unk, byte_fallback)
//   normalizer     none
//   pre_tokenizer  Split (regex or literal, every behavior, invert), ByteLevel, Sequence of them
//   post_processor TemplateProcessing, ByteLevel, Sequence of them
//   decoder        ByteLevel
//   added tokens   matched in the text before pre-tokenization, with lstrip/rstrip/single_word
//
// Thread safety: a loaded Tokenizer is immutable apart from an internal, locked word cache, so
// one instance can serve several threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace afm {

class Tokenizer {
 public:
  static Tokenizer load(const std::string& tokenizer_json_path);
  // The same from the file's text; `origin` names the source in error messages.
  static Tokenizer from_json(std::string_view json_text, const std::string& origin);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // `text` must be valid UTF-8 (HF only accepts Unicode strings); otherwise afm::Error.
  // add_special_tokens applies the post-processor template (e.g. prepends BOS).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const;
  // Ids that name no token are skipped, and invalid UTF-8 becomes U+FFFD, as in HF.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  // One past the largest id of the model vocabulary and the added tokens.
  int32_t vocab_size() const;
  std::optional<int32_t> token_id(std::string_view token) const;  // added tokens first, then vocab
  // The token as the vocabulary spells it (byte-level form, e.g. "Ġworld"); afm::Error if none.
  const std::string& token_text(int32_t id) const;
  bool is_special(int32_t id) const;

  // Appends the raw bytes id decodes to, before UTF-8 repair. Nothing for a skipped special
  // token or an unknown id. decode() and StreamDecoder are built on it.
  void append_token_bytes(int32_t id, bool skip_special_tokens, std::string& out) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Incremental decode for streaming generation: push ids one at a time and get back only whole
// UTF-8 characters. Bytes that may still become a character wait for the next push, so the
// concatenation of every push() and the final flush() equals Tokenizer::decode() of all the ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = true);
  std::string push(int32_t id);
  // Returns whatever is still held back (an unfinished character becomes U+FFFD) and resets.
  std::string flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;  // bytes of a character whose remaining bytes have not arrived yet
};

// GPT-2's byte-level alphabet, in which byte-level BPE vocabularies spell their tokens: `bytes`
// with each byte written as its character, and whether `text` is already spelled in it (valid
// UTF-8 made only of the alphabet's 256 characters).
std::string byte_level_spelling(std::string_view bytes);
bool is_byte_level_spelled(std::string_view text);

// Appends `bytes` to `out` as UTF-8, replacing each ill-formed subsequence by U+FFFD exactly as
// Rust's String::from_utf8_lossy (which HF's decoders use) does.
void append_utf8_lossy(std::string_view bytes, std::string& out);

}  // namespace afm
