// Next-token selection with the semantics of HF transformers' generate(), and generation_config.json.
//
// Order, as generate() builds its logits processors: repetition penalty, then (only when sampling)
// temperature, top-k, top-p, min-p, softmax, one multinomial draw. Greedy decoding applies the
// repetition penalty and takes the argmax.
//
// The PRNG is ours (mt19937_64), so a seed reproduces afm's own runs, not torch's draws.
#pragma once
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace afm {

struct SamplingParams {
  bool do_sample = false;          // false => greedy (argmax); temperature 0 also means greedy
  float temperature = 1.0f;        // >= 0
  float top_p = 1.0f;              // (0, 1]; 1 disables
  float min_p = 0.0f;              // [0, 1]; 0 disables
  float repetition_penalty = 1.0f; // > 0; 1 disables, > 1 discourages tokens already in the context
  int top_k = 0;                   // >= 0; 0 disables
  // OpenAI's penalties, in [-2, 2]: a token this sampler has already drawn loses presence_penalty
  // plus frequency_penalty times its count from its logit (before temperature). 0 disables.
  float presence_penalty = 0.0f, frequency_penalty = 0.0f;
  uint64_t seed = 0;
};

// Throws afm::Error naming the offending parameter. `source` prefixes the message (e.g. a file name).
void validate(const SamplingParams& params, const std::string& source = "sampling");

// A default-constructed GenerationConfig holds HF's GenerationConfig defaults.
struct GenerationConfig {
  SamplingParams sampling{.top_k = 50};  // HF's default top_k is 50, unlike SamplingParams' 0
  std::optional<int> max_new_tokens;     // when set, bounds the generated tokens and overrides max_length
  int max_length = 20;                   // otherwise HF bounds prompt + generated tokens by this
  std::vector<int32_t> eos_token_ids;    // generation stops at any of these
  std::optional<int32_t> bos_token_id, pad_token_id;

  // How many tokens may be generated after a prompt of `prompt_tokens` tokens.
  int new_token_limit(int64_t prompt_tokens) const;
};

// Special token ids from config.json (ModelConfig carries eos and bos). HF's from_pretrained uses them
// only when generation_config.json is absent (GenerationConfig.from_model_config); a file that exists
// is taken as written, and its missing keys get HF's defaults.
// Initialisers let callers name only the ids they have ({.eos_token_ids = ..., .bos_token_id = ...}).
struct ModelTokenIds {
  std::vector<int32_t> eos_token_ids = {};
  std::optional<int32_t> bos_token_id = std::nullopt, pad_token_id = std::nullopt;
};

// Reads generation_config.json. A missing file gives HF's defaults plus `model_ids`; an unreadable or
// malformed file, a key of the wrong type, or an invalid value throws afm::Error.
// A key set to null disables that setting, as None does in HF (e.g. "top_k": null => no top-k).
GenerationConfig load_generation_config(const std::string& path, const ModelTokenIds& model_ids = {});
GenerationConfig parse_generation_config(const std::string& json_text, const std::string& source_name);

// One token that survived filtering, with its probability in the final (renormalised) distribution.
struct Candidate {
  int32_t id;
  float prob;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);  // validates; seeds the PRNG with params.seed

  // logits: one row over the vocabulary; context: every token id so far (prompt + generated), for the
  // repetition penalty. Greedy decoding uses no randomness.
  int32_t sample(std::span<const float> logits, std::span<const int32_t> context);

  // The distribution sample() draws from: the tokens with nonzero probability after the processing
  // chain, in ascending id order, probabilities summing to 1. Greedy gives the argmax alone.
  // The view stays valid until the next call on this Sampler.
  std::span<const Candidate> candidates(std::span<const float> logits, std::span<const int32_t> context);

  const SamplingParams& params() const { return params_; }

 private:
  int32_t draw(std::span<const Candidate> dist);  // one token from candidates()' distribution

  SamplingParams params_;
  std::mt19937_64 rng_;
  // Reused across calls so a 128k vocabulary costs no allocation per token.
  std::vector<float> scores_;       // logits after repetition penalty and temperature
  std::vector<float> order_stat_;   // scratch for the top-k threshold
  std::vector<Candidate> kept_;
  std::unordered_map<int32_t, int> drawn_;  // how often each token was drawn, for OpenAI's penalties
};

}  // namespace afm
