#include "perplexity.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "error.h"

namespace afm {

// -log softmax(logits)[target], in double so a long tail of small probabilities is not lost.
static double token_nll(const float* logits, int64_t vocab, int32_t target) {
  const double max = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int64_t i = 0; i < vocab; i++) sum += std::exp(double(logits[i]) - max);
  return -(double(logits[target]) - max - std::log(sum));
}

static void check_arguments(const Model& model, std::span<const int32_t> tokens, int64_t context, int64_t stride) {
  if (context < 2) throw Error("--ctx must be at least 2 (got " + std::to_string(context) + ")");
  if (context > model.max_seq_len())
    throw Error("--ctx " + std::to_string(context) + " exceeds the model's max_seq_len of " +
                std::to_string(model.max_seq_len()) + " (see --max-seq-len)");
  if (stride < 1 || stride > context)
    throw Error("--stride must be between 1 and --ctx (" + std::to_string(context) + "), got " + std::to_string(stride));
  if (tokens.size() < 2)
    throw Error("--text gives " + std::to_string(tokens.size()) + " token(s); perplexity needs at least 2");
  const int64_t vocab = model.config().vocab_size;
  for (size_t i = 0; i < tokens.size(); i++)
    if (tokens[i] < 0 || tokens[i] >= vocab)
      throw Error("--text token " + std::to_string(i) + " has id " + std::to_string(tokens[i]) +
                  ", outside the model's vocabulary of " + std::to_string(vocab));
}

// The loop of the current guide (transformers docs/source/en/perplexity.md, the nll_sum /
// n_tokens version, not the older one that averaged each window's loss weighted by trg_len):
//
//   for begin in 0, stride, 2*stride, ...:
//     end = min(begin + context, n); trg_len = end - prev_end
//     labels = window tokens, all but the last trg_len set to -100
//     loss = mean NLL over the labels left after the model's shift (label i predicted by row i-1)
//     nll_sum += loss * (trg_len - 1); n_tokens += trg_len - 1
//     stop once end == n
//   ppl = exp(nll_sum / n_tokens)
//
// We keep its weighting exactly, quirk included: when windows overlap, no scored label sits at
// window position 0, so the mean is over trg_len predictions yet weighted by trg_len - 1. (With
// disjoint windows the first label is shifted out and the weight is exact.) A window whose
// weight is 0 adds nothing (HF would add 0 * its loss, or NaN when no label survives the shift),
// so we skip its forward pass but still count it as a window.
PerplexityResult perplexity(Model& model, std::span<const int32_t> tokens, const PerplexityOptions& options) {
  const int64_t context = options.context ? options.context : model.max_seq_len();
  const int64_t stride = options.stride ? options.stride : context;
  check_arguments(model, tokens, context, stride);

  const int64_t n = int64_t(tokens.size()), vocab = model.config().vocab_size;
  auto cache = model.new_cache();
  std::vector<int32_t> positions(size_t(std::min(context, n)));
  std::iota(positions.begin(), positions.end(), 0);

  double nll_sum = 0;
  PerplexityResult result;
  result.context = context;
  result.stride = stride;
  int64_t prev_end = 0;
  for (int64_t begin = 0; prev_end < n; begin += stride) {
    const int64_t end = std::min(begin + context, n), length = end - begin, trg_len = end - prev_end;
    const int64_t weight = trg_len - 1;
    if (weight > 0) {
      cache->clear();  // each window is a separate sequence, as HF's separate model() calls are
      const Tensor logits = model.forward(tokens.subspan(size_t(begin), size_t(length)),
                                          std::span(positions).first(size_t(length)), *cache);
      const int64_t first = std::max<int64_t>(length - trg_len, 1);  // label 0 has no row to predict it
      double window_nll = 0;
      for (int64_t i = first; i < length; i++) window_nll += token_nll(logits.row(i - 1), vocab, tokens[begin + i]);
      nll_sum += window_nll / double(length - first) * double(weight);
      result.tokens_scored += weight;
    }
    result.windows++;
    prev_end = end;
    if (options.on_progress) options.on_progress(end, n);
  }
  result.nll_per_token = nll_sum / double(result.tokens_scored);
  result.perplexity = std::exp(result.nll_per_token);
  return result;
}

}  // namespace afm
