// The generate loop with HF semantics: prefill the prompt, then sample one token at a time until
// an eos id, a stop string or the token limit; text streams out as it is decoded.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "model.h"
#include "sampler.h"
#include "tokenizer.h"

namespace afm {

struct GenerateOptions {
  SamplingParams sampling;
  int max_new_tokens = 128;
  std::vector<int32_t> eos_token_ids;
  std::vector<std::string> stop_strings;  // generation ends before the first one; it is not emitted
};

struct GenerateStats {
  int64_t prompt_tokens = 0, cached_prompt_tokens = 0, generated_tokens = 0;
  double ttft_ms = 0;               // prompt in, first token out
  double decode_tokens_per_s = 0;   // tokens after the first, per second, for this one user
  std::string finish_reason;        // "eos", "stop" or "length"
};

// A conversation's state: the KV cache and the tokens it holds, so that the next turn only
// prefills what is new.
struct Session {
  explicit Session(const Model& model) : cache(model.new_cache()) {}
  std::unique_ptr<KVCache> cache;
  std::vector<int32_t> tokens;
};

using TextSink = std::function<void(std::string_view text)>;

// Holds back streamed text that might be the start of a stop string.
class StopStringFilter {
 public:
  explicit StopStringFilter(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Text safe to emit now; after a stop string appears, only the text before it, and stopped() turns true.
  std::string push(std::string_view text);
  std::string flush();  // the held-back rest, at the end of generation
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;
  bool stopped_ = false;
};

// One sequence's generation, step by step, apart from the forward pass: sampling, eos, stop
// strings, the token and context limits, and the streamed text. generate() drives one through a
// model alone; the server's scheduler drives many through batched forwards.
class TokenGenerator {
 public:
  // `context_limit`: the most positions the sequence may hold (the model's max_seq_len).
  TokenGenerator(const Tokenizer& tokenizer, std::span<const int32_t> prompt, const GenerateOptions& options,
                 int64_t context_limit);

  // Picks the next token from the logits that follow the tokens so far; returns the text now safe
  // to emit (with the held-back rest once finished). Call only while !finished().
  std::string step(std::span<const float> logits);

  bool finished() const { return !finish_reason_.empty(); }
  const std::string& finish_reason() const { return finish_reason_; }  // "eos", "stop", "length"
  int32_t last_token() const { return last_token_; }   // what step() picked: the next token to feed
  int64_t generated_tokens() const { return generated_; }  // eos included, as HF counts it
  // Prompt and generated tokens (eos excepted); the last one is not yet fed to the model.
  const std::vector<int32_t>& tokens() const { return context_; }

 private:
  GenerateOptions options_;
  int64_t context_limit_;
  Sampler sampler_;
  StreamDecoder decoder_;
  StopStringFilter stop_filter_;
  std::vector<int32_t> context_;  // also the repetition penalty's context
  int32_t last_token_ = -1;
  int64_t generated_ = 0;
  std::string finish_reason_;
};

GenerateStats generate(Model& model, const Tokenizer& tokenizer, Session& session, std::span<const int32_t> prompt,
                       const GenerateOptions& options, const TextSink& on_text);

}  // namespace afm
