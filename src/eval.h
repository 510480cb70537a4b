// Teacher-forcing evaluation against reference outputs made by HF transformers (the fixture
// format: prompt.N.ids / .generated / .logits / .decode_logits / .hidden.L, with optional
// .logit_rows / .decode_rows when only some rows are kept; docs/REFERENCE.md).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model.h"

namespace afm {

struct PromptReference {
  std::vector<int32_t> ids;          // the prompt, BOS included
  std::vector<int32_t> generated;    // HF's greedy continuation
  std::vector<float> logits;         // [logit_rows or ids, vocab], or empty
  std::vector<float> decode_logits;  // [decode_rows or generated, vocab], or empty
  std::map<int64_t, std::vector<float>> hidden;  // layer -> [logit_rows or ids, hidden]
  // A compact reference keeps whole rows only at some prompt positions and decode steps (in
  // increasing order); empty means every one.
  std::vector<int64_t> logit_rows, decode_rows;
};

struct Reference {
  int64_t vocab_size = 0;   // 0 when the reference carries no logits
  int64_t hidden_size = 0;  // 0 when it carries no hidden states
  std::vector<PromptReference> prompts;
};

Reference load_reference(const std::string& safetensors_path);

// Keep the first `max_new_tokens` reference steps of every prompt (0: all); throws when a prompt has fewer.
void truncate_steps(Reference& reference, int64_t max_new_tokens, const std::string& source);

// The bring-up note's eval: a prompt tokenized by afm, and the reference tokens HF generated after
// it, from a reference.safetensors (its prompt 0, whose ids must equal `prompt_ids`) or from a
// JSON array of ids. Keeps the first `max_new_tokens` steps (0: all).
Reference prompt_reference(const std::vector<int32_t>& prompt_ids, const std::string& reference_tokens_path,
                           int64_t max_new_tokens);

struct PromptResult {
  int64_t prompt_tokens = 0, steps = 0;
  double prefill_max_rel_err = -1, decode_max_rel_err = -1;  // -1: no reference logits
  double top1 = 0, top5 = 0;
  std::vector<int64_t> top1_misses;      // steps whose reference token was not our argmax
  std::vector<double> layer_max_rel_err;  // per hidden state, when asked for and present
};

struct EvalResult {
  std::vector<PromptResult> prompts;
  double top1 = 0, top5 = 0;  // over all steps of all prompts
  double prefill_max_rel_err = -1, decode_max_rel_err = -1;
};

// Feed each prompt, then each reference token in turn (never our own choice), and check that the
// reference's next token is our argmax (top-1) or among our 5 largest logits (top-5).
// Throws afm::Error when the reference does not fit the model (vocabulary, token ids).
EvalResult teacher_forcing_eval(Model& model, const Reference& reference, bool compare_layers);

// max over rows of ||ours - ref|| / ||ref||
double max_row_relative_error(const float* ours, const float* ref, int64_t rows, int64_t cols);

}  // namespace afm
