#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "error.h"

namespace afm {

namespace {

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// HF's generate() adds the sampling warpers only when do_sample is set; a zero temperature cannot
// divide logits, so it is read as "no randomness" too.
bool is_greedy(const SamplingParams& p) { return !p.do_sample || p.temperature == 0.0f; }

// Dividing a negative logit would raise it, so negative logits are multiplied instead (as HF does):
// either way a penalty > 1 makes the token less likely.
float penalize(float logit, float penalty) { return logit < 0 ? logit * penalty : logit / penalty; }

// First maximal index, like torch.argmax.
int32_t argmax(std::span<const float> v) {
  size_t best = 0;
  for (size_t i = 1; i < v.size(); i++)
    if (v[i] > v[best]) best = i;
  return static_cast<int32_t>(best);
}

void normalize(std::vector<Candidate>& c) {
  double sum = 0;
  for (const Candidate& x : c) sum += x.prob;
  for (Candidate& x : c) x.prob = static_cast<float>(x.prob / sum);
}

bool by_id(const Candidate& a, const Candidate& b) { return a.id < b.id; }

// Descending probability; equal probabilities rank the lower id first, so ties resolve the same way
// on every run (torch.sort gives no such promise).
bool by_prob(const Candidate& a, const Candidate& b) {
  return a.prob > b.prob || (a.prob == b.prob && a.id < b.id);
}

}  // namespace

void validate(const SamplingParams& p, const std::string& source) {
  auto fail = [&](const std::string& what) { throw Error(source + ": " + what); };
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature))
    fail("temperature must be a finite number >= 0 (0 = greedy), got " + num(p.temperature));
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("top_p must be in (0, 1], got " + num(p.top_p));
  if (!(p.min_p >= 0 && p.min_p <= 1)) fail("min_p must be in [0, 1], got " + num(p.min_p));
  if (!(p.repetition_penalty > 0) || !std::isfinite(p.repetition_penalty))
    fail("repetition_penalty must be a finite number > 0, got " + num(p.repetition_penalty));
  for (auto [name, value] : {std::pair{"presence_penalty", p.presence_penalty}, {"frequency_penalty", p.frequency_penalty}})
    if (!(value >= -2 && value <= 2)) fail(std::string(name) + " must be in [-2, 2], got " + num(value));
  if (p.top_k < 0) fail("top_k must be >= 0 (0 = disabled), got " + std::to_string(p.top_k));
}

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) { validate(params); }

std::span<const Candidate> Sampler::candidates(std::span<const float> logits,
                                               std::span<const int32_t> context) {
  if (logits.empty()) throw Error("sampler: empty logits row");
  const size_t n = logits.size();
  const bool greedy = is_greedy(params_);
  const float temperature = greedy ? 1.0f : params_.temperature;
  const float penalty = params_.repetition_penalty;

  // Repetition penalty, then temperature. A token repeated in the context is penalised once:
  // HF gathers the original logits before scattering the penalised ones back.
  scores_.resize(n);
  for (size_t i = 0; i < n; i++) scores_[i] = logits[i] / temperature;
  for (int32_t id : context) {
    if (id < 0 || static_cast<size_t>(id) >= n)
      throw Error("sampler: context token id " + std::to_string(id) + " outside the vocabulary of " +
                  std::to_string(n));
    if (penalty != 1.0f) scores_[id] = penalize(logits[id], penalty) / temperature;
  }
  for (auto [id, count] : drawn_)
    scores_[id] -= (params_.presence_penalty + params_.frequency_penalty * float(count)) / temperature;

  kept_.clear();
  if (greedy) {
    kept_.push_back({argmax(scores_), 1.0f});
    return kept_;
  }

  // Top-k: HF removes the tokens scoring below the k-th largest score, so ties with it survive.
  // nth_element finds that score in linear time; no sort of the vocabulary.
  float threshold = -std::numeric_limits<float>::infinity();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < n) {
    order_stat_.assign(scores_.begin(), scores_.end());
    auto kth = order_stat_.begin() + (params_.top_k - 1);
    std::nth_element(order_stat_.begin(), kth, order_stat_.end(), std::greater<float>());
    threshold = *kth;
  }
  float max_score = -std::numeric_limits<float>::infinity();
  for (size_t i = 0; i < n; i++) {
    if (scores_[i] >= threshold) {
      kept_.push_back({static_cast<int32_t>(i), scores_[i]});
      max_score = std::max(max_score, scores_[i]);
    }
  }
  if (!std::isfinite(max_score)) throw Error("sampler: no finite logit to sample from");

  // Softmax over the survivors. Tokens whose probability underflows to 0 (or whose logit is -inf)
  // can never be drawn, so they leave the set.
  for (Candidate& c : kept_) c.prob = std::exp(c.prob - max_score);
  std::erase_if(kept_, [](const Candidate& c) { return c.prob == 0.0f; });
  normalize(kept_);

  if (params_.top_p < 1.0f) {
    // HF sorts ascending and removes every token whose cumulative probability is <= 1 - top_p.
    // Read from the top down, a token stays while the mass ranked above it is < top_p: the smallest
    // prefix whose mass reaches top_p, and never less than the most probable token.
    //
    // Only the head of the distribution can qualify. A token (other than the first) with probability
    // below (1 - top_p) / (m - 1), together with everything ranked after it, holds less than
    // 1 - top_p, so it is removed. Setting those aside first avoids sorting a 128k vocabulary when
    // top-k is off. If even the first token is below the bound, the whole set is sorted.
    auto head_end = kept_.end();
    if (kept_.size() > 1) {
      const double bound = (1.0 - params_.top_p) / static_cast<double>(kept_.size() - 1);
      auto split = std::partition(kept_.begin(), kept_.end(),
                                  [&](const Candidate& c) { return c.prob >= bound; });
      if (split != kept_.begin()) head_end = split;
    }
    std::sort(kept_.begin(), head_end, by_prob);
    const size_t head = static_cast<size_t>(head_end - kept_.begin());
    size_t keep = 1;
    double above = kept_[0].prob;
    while (keep < head && above < params_.top_p) above += kept_[keep++].prob;
    kept_.resize(keep);
    std::sort(kept_.begin(), kept_.end(), by_id);
  }

  if (params_.min_p > 0.0f) {
    // Relative to the most probable token, so renormalising after top-p would not change the outcome.
    float top = 0;
    for (const Candidate& c : kept_) top = std::max(top, c.prob);
    const float floor = params_.min_p * top;
    std::erase_if(kept_, [&](const Candidate& c) { return c.prob < floor; });
  }

  normalize(kept_);
  return kept_;
}

int32_t Sampler::sample(std::span<const float> logits, std::span<const int32_t> context) {
  const int32_t id = draw(candidates(logits, context));
  if (params_.presence_penalty != 0.0f || params_.frequency_penalty != 0.0f) drawn_[id]++;
  return id;
}

int32_t Sampler::draw(std::span<const Candidate> dist) {
  if (is_greedy(params_)) return dist[0].id;
  // One draw per sampled token, so the PRNG stream and the token sequence advance together. The top
  // 53 bits make a uniform double in [0, 1) identically on every platform, which
  // std::uniform_real_distribution does not promise.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  double cumulative = 0;
  for (const Candidate& c : dist) {
    cumulative += c.prob;
    if (u < cumulative) return c.id;
  }
  return dist.back().id;  // u fell past a total that rounded just below 1
}

int GenerationConfig::new_token_limit(int64_t prompt_tokens) const {
  if (max_new_tokens) return *max_new_tokens;
  return static_cast<int>(std::max<int64_t>(0, max_length - prompt_tokens));
}

GenerationConfig parse_generation_config(const std::string& json_text, const std::string& source) {
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(json_text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(source + ": malformed JSON: " + e.what());
  }
  if (!root.is_object()) throw Error(source + ": expected a JSON object at the top level");

  auto fail = [&](const std::string& key, const std::string& what) {
    throw Error(source + ": \"" + key + "\" " + what);
  };
  // Each reader leaves the HF default in place when the key is absent. `null` is HF's None.
  auto number = [&](const char* key, float& out, float when_null) {
    auto it = root.find(key);
    if (it == root.end()) return;
    if (it->is_null()) out = when_null;
    else if (it->is_number()) out = static_cast<float>(it->get<double>());
    else fail(key, "must be a number, got " + it->dump());
  };
  auto integer = [&](const char* key, const nlohmann::json& v, int64_t lo, int64_t hi) -> int64_t {
    if (!v.is_number_integer()) fail(key, "must be an integer, got " + v.dump());
    // Unsigned JSON integers above INT64_MAX would wrap in get<int64_t>; they are out of range anyway.
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(hi))
      fail(key, "is out of range: " + v.dump());
    const int64_t x = v.get<int64_t>();
    if (x < lo || x > hi) fail(key, "is out of range: " + v.dump());
    return x;
  };
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  auto token_id = [&](const char* key, std::optional<int32_t>& out) {
    auto it = root.find(key);
    if (it == root.end() || it->is_null()) return;
    out = static_cast<int32_t>(integer(key, *it, 0, kIntMax));
  };

  GenerationConfig cfg;
  SamplingParams& s = cfg.sampling;
  if (auto it = root.find("do_sample"); it != root.end() && !it->is_null()) {
    if (!it->is_boolean()) fail("do_sample", "must be true or false, got " + it->dump());
    s.do_sample = it->get<bool>();
  }
  number("temperature", s.temperature, 1.0f);
  number("top_p", s.top_p, 1.0f);
  number("min_p", s.min_p, 0.0f);
  number("repetition_penalty", s.repetition_penalty, 1.0f);
  if (auto it = root.find("top_k"); it != root.end())
    s.top_k = it->is_null() ? 0 : static_cast<int>(integer("top_k", *it, 0, kIntMax));
  if (auto it = root.find("max_new_tokens"); it != root.end() && !it->is_null())
    cfg.max_new_tokens = static_cast<int>(integer("max_new_tokens", *it, 1, kIntMax));
  if (auto it = root.find("max_length"); it != root.end() && !it->is_null())
    cfg.max_length = static_cast<int>(integer("max_length", *it, 1, kIntMax));
  if (auto it = root.find("eos_token_id"); it != root.end() && !it->is_null()) {
    // HF accepts a single id or a list of them.
    if (it->is_array()) {
      for (const nlohmann::json& v : *it)
        cfg.eos_token_ids.push_back(static_cast<int32_t>(integer("eos_token_id", v, 0, kIntMax)));
    } else {
      cfg.eos_token_ids.push_back(static_cast<int32_t>(integer("eos_token_id", *it, 0, kIntMax)));
    }
  }
  token_id("bos_token_id", cfg.bos_token_id);
  token_id("pad_token_id", cfg.pad_token_id);

  validate(s, source);
  return cfg;
}

GenerationConfig load_generation_config(const std::string& path, const ModelTokenIds& model_ids) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    GenerationConfig cfg;
    cfg.eos_token_ids = model_ids.eos_token_ids;
    cfg.bos_token_id = model_ids.bos_token_id;
    cfg.pad_token_id = model_ids.pad_token_id;
    return cfg;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open generation config");
  std::stringstream text;
  text << in.rdbuf();
  return parse_generation_config(text.str(), path);
}

}  // namespace afm
