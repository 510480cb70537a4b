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
  Sampler sampler(options.sampling);
  StreamDecoder decoder(tokenizer, /*skip_special_tokens=*/true);
  StopStringFilter stop_filter(options.stop_strings);
  std::vector<int32_t> context(prompt.begin(), prompt.end());  // for the repetition penalty

  const auto start = Clock::now();
  std::span<const int32_t> pending = prompt.subspan(reused);
  auto first_token_time = start;
  stats.finish_reason = "length";
  for (int step = 0; step < options.max_new_tokens; step++) {
    if (session.tokens.size() + pending.size() > size_t(limit)) break;  // context full
    std::vector<int32_t> positions(pending.size());
    std::iota(positions.begin(), positions.end(), int32_t(session.tokens.size()));
    Tensor logits = model.forward(pending, positions, *session.cache, Logits::Last);
    session.tokens.insert(session.tokens.end(), pending.begin(), pending.end());

    const int32_t token = sampler.sample({logits.data, size_t(logits.cols)}, context);
    if (step == 0) first_token_time = Clock::now();
    stats.generated_tokens++;
    if (std::find(options.eos_token_ids.begin(), options.eos_token_ids.end(), token) != options.eos_token_ids.end()) {
      stats.finish_reason = "eos";
      break;
    }
    context.push_back(token);
    const std::string text = stop_filter.push(decoder.push(token));
    if (!text.empty()) on_text(text);
    if (stop_filter.stopped()) {
      stats.finish_reason = "stop";
      break;
    }
    pending = std::span<const int32_t>(&context.back(), 1);
  }
  const std::string rest = stop_filter.push(decoder.flush()) + stop_filter.flush();
  if (!rest.empty()) on_text(rest);

  const auto end = Clock::now();
  stats.ttft_ms = std::chrono::duration<double, std::milli>(first_token_time - start).count();
  const double decode_seconds = std::chrono::duration<double>(end - first_token_time).count();
  if (stats.generated_tokens > 1 && decode_seconds > 0)
    stats.decode_tokens_per_s = double(stats.generated_tokens - 1) / decode_seconds;
  return stats;
}

}  // namespace afm
