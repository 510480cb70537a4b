#include "generate.h"

#include <algorithm>
#include <chrono>
#include <numeric>

#include "error.h"

namespace afm {

std::string StopStringFilter::push(std::string_view text) {
  if (stopped_) return {};
  pending_ += text;
  size_t first_stop = std::string::npos;
  for (const std::string& stop : stops_) first_stop = std::min(first_stop, pending_.find(stop));
  if (first_stop != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, first_stop);
    pending_.clear();
    return out;
  }
  // Keep the longest tail that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& stop : stops_)
    for (size_t n = std::min(stop.size() - 1, pending_.size()); n > keep; n--)
      if (pending_.compare(pending_.size() - n, n, stop, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StopStringFilter::flush() {
  std::string out = stopped_ ? std::string() : pending_;
  pending_.clear();
  return out;
}

TokenGenerator::TokenGenerator(const Tokenizer& tokenizer, std::span<const int32_t> prompt,
                               const GenerateOptions& options, int64_t context_limit)
    : options_(options),
      context_limit_(context_limit),
      sampler_(options.sampling),
      decoder_(tokenizer, /*skip_special_tokens=*/true),
      stop_filter_(options.stop_strings),
      context_(prompt.begin(), prompt.end()) {
  if (options.max_new_tokens <= 0) finish_reason_ = "length";
}

std::string TokenGenerator::step(std::span<const float> logits) {
  if (finished()) throw Error("TokenGenerator::step after the sequence finished");
  last_token_ = sampler_.sample(logits, context_);
  generated_++;
  std::string text;
  const auto& eos = options_.eos_token_ids;
  if (std::find(eos.begin(), eos.end(), last_token_) != eos.end()) {
    finish_reason_ = "eos";
  } else {
    context_.push_back(last_token_);
    text = stop_filter_.push(decoder_.push(last_token_));
    if (stop_filter_.stopped())
      finish_reason_ = "stop";
    else if (generated_ >= options_.max_new_tokens || int64_t(context_.size()) > context_limit_)
      finish_reason_ = "length";  // no room for another token, or no position to feed this one at
  }
  if (finished()) text += stop_filter_.push(decoder_.flush()) + stop_filter_.flush();
  return text;
}

GenerateStats generate(Model& model, const Tokenizer& tokenizer, Session& session, std::span<const int32_t> prompt,
                       const GenerateOptions& options, const TextSink& on_text) {
  using Clock = std::chrono::steady_clock;
  if (prompt.empty()) throw Error("the prompt is empty");
  const int64_t limit = model.max_seq_len();
  if (int64_t(prompt.size()) > limit)
    throw Error("the prompt has " + std::to_string(prompt.size()) + " tokens but the context holds " +
                std::to_string(limit) + " (shorten the prompt or raise --max-seq-len)");

  // Reuse the cached prefix this prompt shares with the session; at least one token is
  // prefilled so that there are logits to sample from.
  auto [cached_end, prompt_end] = std::mismatch(session.tokens.begin(), session.tokens.end(), prompt.begin(), prompt.end());
  const int64_t reused = std::min<int64_t>(cached_end - session.tokens.begin(), int64_t(prompt.size()) - 1);
  session.cache->truncate(reused);
  session.tokens.resize(reused);

  GenerateStats stats;
  stats.prompt_tokens = int64_t(prompt.size());
  stats.cached_prompt_tokens = reused;
  TokenGenerator generator(tokenizer, prompt, options, limit);

  const auto start = Clock::now();
  auto first_token_time = start;
  std::vector<int32_t> pending(prompt.begin() + reused, prompt.end());
  while (!generator.finished()) {
    std::vector<int32_t> positions(pending.size());
    std::iota(positions.begin(), positions.end(), int32_t(session.tokens.size()));
    Tensor logits = model.forward(pending, positions, *session.cache, Logits::Last);
    session.tokens.insert(session.tokens.end(), pending.begin(), pending.end());
    const std::string text = generator.step({logits.data, size_t(logits.cols)});
    if (generator.generated_tokens() == 1) first_token_time = Clock::now();
    if (!text.empty()) on_text(text);
    pending.assign(1, generator.last_token());
  }
  stats.generated_tokens = generator.generated_tokens();
  stats.finish_reason = generator.finish_reason();

  const auto end = Clock::now();
  stats.ttft_ms = std::chrono::duration<double, std::milli>(first_token_time - start).count();
  const double decode_seconds = std::chrono::duration<double>(end - first_token_time).count();
  if (stats.generated_tokens > 1 && decode_seconds > 0)
    stats.decode_tokens_per_s = double(stats.generated_tokens - 1) / decode_seconds;
  return stats;
}

}  // namespace afm
