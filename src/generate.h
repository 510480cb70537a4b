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

GenerateStats generate(Model& model, const Tokenizer& tokenizer, Session& session, std::span<const int32_t> prompt,
                       const GenerateOptions& options, const TextSink& on_text);

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

}  // namespace afm
