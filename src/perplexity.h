// Perplexity of a token sequence under a fixed-context model, with the strided sliding window of
// HF transformers' guide "Perplexity of fixed-length models", so afm's numbers compare with theirs.
#pragma once
#include <cstdint>
#include <functional>
#include <span>

#include "model.h"

namespace afm {

struct PerplexityOptions {
  int64_t context = 0;  // tokens per window; 0: the model's max_seq_len
  int64_t stride = 0;   // distance between window starts; 0: = context (disjoint windows)
  std::function<void(int64_t done, int64_t total)> on_progress;  // after each window, in tokens
};

struct PerplexityResult {
  double perplexity = 0;     // exp(nll_per_token)
  double nll_per_token = 0;  // natural log
  int64_t tokens_scored = 0;  // HF's n_tokens: the count the summed NLL is divided by
  int64_t windows = 0;
  int64_t context = 0, stride = 0;  // as resolved from the options' defaults
};

// Throws afm::Error (naming --ctx, --stride or --text) unless 2 <= context <= max_seq_len,
// 1 <= stride <= context, there are at least 2 tokens and every id is in the vocabulary.
PerplexityResult perplexity(Model& model, std::span<const int32_t> tokens, const PerplexityOptions& options);

}  // namespace afm
