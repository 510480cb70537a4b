#include "eval.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "error.h"
#include "safetensors.h"

namespace afm {

static std::vector<int32_t> to_ids(const TensorView& view) {
  std::vector<int32_t> ids;
  for (int64_t id : view.to_i64()) {
    if (id < 0 || id > INT32_MAX) throw Error(view.describe() + ": token id " + std::to_string(id) + " is out of range");
    ids.push_back(int32_t(id));
  }
  return ids;
}

// A [rows, width] float tensor of a reference: rows must match its tokens, and `width` (0 until
// the first such tensor sets it) must agree across all tensors of the kind.
static std::vector<float> matrix(const std::string& path, const TensorView& view, size_t rows, int64_t& width) {
  if (view.shape.size() != 2 || view.shape[0] != int64_t(rows))
    throw Error(path + ": " + view.describe() + " does not match the prompt's token count");
  if (width && view.shape[1] != width) throw Error(path + ": " + view.describe() + " disagrees with the width of the others");
  width = view.shape[1];
  return view.to_f32();
}

// Row indices below `limit`, strictly increasing (absent: empty, meaning every row).
static std::vector<int64_t> row_indices(const SafetensorsFile& file, const std::string& name, size_t limit) {
  if (!file.contains(name)) return {};
  std::vector<int64_t> rows = file.get(name).to_i64();
  for (size_t i = 0; i < rows.size(); i++)
    if (rows[i] < 0 || rows[i] >= int64_t(limit) || (i && rows[i] <= rows[i - 1]))
      throw Error(file.path() + ": " + name + " must be increasing row numbers below " + std::to_string(limit));
  return rows;
}

Reference load_reference(const std::string& path) {
  SafetensorsFile file = SafetensorsFile::open(path);
  Reference ref;
  for (int n = 0; file.contains("prompt." + std::to_string(n) + ".ids"); n++) {
    const std::string p = "prompt." + std::to_string(n) + ".";
    PromptReference& prompt = ref.prompts.emplace_back();
    prompt.ids = to_ids(file.get(p + "ids"));
    if (file.contains(p + "generated")) prompt.generated = to_ids(file.get(p + "generated"));
    prompt.logit_rows = row_indices(file, p + "logit_rows", prompt.ids.size());
    prompt.decode_rows = row_indices(file, p + "decode_rows", prompt.generated.size());
    const size_t prompt_rows = prompt.logit_rows.empty() ? prompt.ids.size() : prompt.logit_rows.size();
    const size_t decode_rows = prompt.decode_rows.empty() ? prompt.generated.size() : prompt.decode_rows.size();
    if (file.contains(p + "logits")) prompt.logits = matrix(path, file.get(p + "logits"), prompt_rows, ref.vocab_size);
    if (file.contains(p + "decode_logits"))
      prompt.decode_logits = matrix(path, file.get(p + "decode_logits"), decode_rows, ref.vocab_size);
    for (int64_t layer = 0; file.contains(p + "hidden." + std::to_string(layer)); layer++)
      prompt.hidden[layer] = matrix(path, file.get(p + "hidden." + std::to_string(layer)), prompt_rows, ref.hidden_size);
  }
  if (ref.prompts.empty()) throw Error(path + ": no prompt.0.ids tensor; not an afm/HF reference file");
  return ref;
}

Reference prompt_reference(const std::vector<int32_t>& prompt_ids, const std::string& path, int64_t max_new_tokens) {
  Reference ref;
  PromptReference prompt;
  if (path.ends_with(".json")) {
    std::ifstream in(path);
    if (!in) throw Error("cannot read " + path);
    try {
      prompt.generated = nlohmann::json::parse(in).get<std::vector<int32_t>>();
    } catch (const nlohmann::json::exception&) {
      throw Error(path + ": expected a JSON array of token ids");
    }
  } else {
    ref = load_reference(path);
    prompt = std::move(ref.prompts[0]);
    ref.prompts.clear();
    if (prompt.ids != prompt_ids)
      throw Error(path + ": its prompt.0.ids (" + std::to_string(prompt.ids.size()) + " tokens) differ from the prompt file's " +
                  std::to_string(prompt_ids.size()) + " tokens: the reference was made from another prompt or tokenizer");
  }
  prompt.ids = prompt_ids;
  ref.prompts.push_back(std::move(prompt));
  truncate_steps(ref, max_new_tokens, path);
  return ref;
}

void truncate_steps(Reference& reference, int64_t max_new_tokens, const std::string& source) {
  if (max_new_tokens <= 0) return;
  for (PromptReference& prompt : reference.prompts) {
    const int64_t available = int64_t(prompt.generated.size());
    if (max_new_tokens > available)
      throw Error(source + " holds " + std::to_string(available) + " reference tokens, fewer than --max-new-tokens " +
                  std::to_string(max_new_tokens));
    prompt.generated.resize(max_new_tokens);
    int64_t kept_rows = max_new_tokens;
    if (!prompt.decode_rows.empty()) {
      std::erase_if(prompt.decode_rows, [&](int64_t step) { return step >= max_new_tokens; });
      kept_rows = int64_t(prompt.decode_rows.size());
    }
    if (!prompt.decode_logits.empty()) prompt.decode_logits.resize(kept_rows * reference.vocab_size);
  }
}

double max_row_relative_error(const float* ours, const float* ref, int64_t rows, int64_t cols) {
  double worst = 0;
  for (int64_t r = 0; r < rows; r++) {
    double diff = 0, norm = 0;
    for (int64_t c = 0; c < cols; c++) {
      const double d = double(ours[r * cols + c]) - ref[r * cols + c];
      diff += d * d;
      norm += double(ref[r * cols + c]) * ref[r * cols + c];
    }
    const double err = std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
    // NaN or inf in our output is the worst possible error, never a silent zero.
    worst = std::isfinite(err) ? std::max(worst, err) : INFINITY;
  }
  return worst;
}

// How many logits beat the token's (ties go to the lower id, as torch.argmax and topk do). A NaN
// anywhere makes the token last: a broken forward pass must never count as a hit.
static int64_t rank_of(const float* logits, int64_t vocab, int32_t token) {
  if (!std::isfinite(logits[token])) return vocab;
  int64_t rank = 0;
  for (int64_t i = 0; i < vocab; i++)
    rank += std::isnan(logits[i]) || logits[i] > logits[token] || (logits[i] == logits[token] && i < token);
  return rank;
}

static void check_fits(const Model& model, const Reference& reference) {
  const int64_t vocab = model.config().vocab_size;
  if (reference.hidden_size && reference.hidden_size != model.config().hidden_size)
    throw Error("the reference's hidden states are " + std::to_string(reference.hidden_size) +
                " wide but the model's hidden size is " + std::to_string(model.config().hidden_size));
  for (const PromptReference& p : reference.prompts)
    if (!p.hidden.empty() && p.hidden.rbegin()->first > model.config().num_layers)
      throw Error("the reference has more hidden states than the model has layers");
  if (reference.vocab_size && reference.vocab_size != vocab)
    throw Error("the reference's logits have " + std::to_string(reference.vocab_size) +
                " columns but the model's vocabulary is " + std::to_string(vocab) + ": wrong model for this reference");
  for (const PromptReference& p : reference.prompts) {
    for (const auto* ids : {&p.ids, &p.generated})
      for (int32_t id : *ids)
        if (id < 0 || id >= vocab)
          throw Error("the reference contains token id " + std::to_string(id) + ", outside the model's vocabulary of " +
                      std::to_string(vocab));
    // The last reference token is scored, never fed.
    const int64_t positions = int64_t(p.ids.size() + std::max<size_t>(p.generated.size(), 1) - 1);
    if (positions > model.max_seq_len())
      throw Error("a reference prompt needs " + std::to_string(positions) +
                  " positions but the model was built with max_seq_len " + std::to_string(model.max_seq_len()));
  }
}

// max_row_relative_error of `ours` ([T, cols]) against a reference that holds only `rows` of it
// (every row when `rows` is empty).
static double rows_relative_error(const float* ours, int64_t T, int64_t cols, const std::vector<float>& ref,
                                  const std::vector<int64_t>& rows) {
  if (rows.empty()) return max_row_relative_error(ours, ref.data(), T, cols);
  double worst = 0;
  for (size_t i = 0; i < rows.size(); i++)
    worst = std::max(worst, max_row_relative_error(ours + rows[i] * cols, &ref[i * cols], 1, cols));
  return worst;
}

static PromptResult eval_prompt(Model& model, const PromptReference& ref, bool compare_layers) {
  const int64_t vocab = model.config().vocab_size, hidden = model.config().hidden_size;
  const int64_t T = int64_t(ref.ids.size());
  PromptResult result;
  result.prompt_tokens = T;
  auto cache = model.new_cache();

  std::vector<int32_t> positions(T);
  std::iota(positions.begin(), positions.end(), 0);
  HiddenStateTap tap;
  if (compare_layers) {
    tap = [&](int64_t layer, const Tensor& h) {
      auto it = ref.hidden.find(layer);
      if (it != ref.hidden.end())
        result.layer_max_rel_err.push_back(rows_relative_error(h.data, T, hidden, it->second, ref.logit_rows));
    };
  }
  Tensor logits = model.forward(ref.ids, positions, *cache, Logits::All, tap);
  if (!ref.logits.empty()) result.prefill_max_rel_err = rows_relative_error(logits.data, T, vocab, ref.logits, ref.logit_rows);

  // Step i scores reference token i given the prompt and reference tokens 0..i-1.
  std::vector<float> step_logits(logits.row(T - 1), logits.row(T - 1) + vocab);
  int64_t top1 = 0, top5 = 0;
  double decode_err = 0;
  size_t decode_row = 0;  // the next of ref.decode_rows
  for (size_t i = 0; i < ref.generated.size(); i++) {
    if (i > 0) {
      const int32_t token = ref.generated[i - 1], position = int32_t(T + i - 1);
      Tensor next = model.forward({&token, 1}, {&position, 1}, *cache);
      step_logits.assign(next.data, next.data + vocab);
    }
    const bool has_row = ref.decode_rows.empty() || (decode_row < ref.decode_rows.size() && ref.decode_rows[decode_row] == int64_t(i));
    if (!ref.decode_logits.empty() && has_row) {
      const size_t row = ref.decode_rows.empty() ? i : decode_row;
      decode_err = std::max(decode_err, max_row_relative_error(step_logits.data(), &ref.decode_logits[row * vocab], 1, vocab));
    }
    if (has_row && !ref.decode_rows.empty()) decode_row++;
    const int64_t rank = rank_of(step_logits.data(), vocab, ref.generated[i]);
    top1 += rank == 0;
    top5 += rank < 5;
    if (rank != 0) result.top1_misses.push_back(int64_t(i));
  }
  result.steps = int64_t(ref.generated.size());
  if (!ref.decode_logits.empty()) result.decode_max_rel_err = decode_err;
  if (result.steps) {
    result.top1 = double(top1) / double(result.steps);
    result.top5 = double(top5) / double(result.steps);
  }
  return result;
}

EvalResult teacher_forcing_eval(Model& model, const Reference& reference, bool compare_layers) {
  check_fits(model, reference);
  EvalResult total;
  double top1 = 0, top5 = 0;
  int64_t steps = 0;
  for (const PromptReference& p : reference.prompts) {
    PromptResult r = eval_prompt(model, p, compare_layers);
    top1 += r.top1 * double(r.steps);
    top5 += r.top5 * double(r.steps);
    steps += r.steps;
    total.prefill_max_rel_err = std::max(total.prefill_max_rel_err, r.prefill_max_rel_err);
    total.decode_max_rel_err = std::max(total.decode_max_rel_err, r.decode_max_rel_err);
    total.prompts.push_back(std::move(r));
  }
  if (steps) {
    total.top1 = top1 / double(steps);
    total.top5 = top5 / double(steps);
  }
  return total;
}

}  // namespace afm
