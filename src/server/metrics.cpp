#include "server/metrics.h"

#include <algorithm>
#include <cstdio>

namespace afm::server {

namespace {

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

void write_value(const std::string& name, const char* type, const std::string& help, double value, std::string& out) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " + number(value) + "\n";
}

}  // namespace

void Histogram::observe(double value) {
  const size_t bucket = size_t(std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  if (bucket < counts_.size()) counts_[bucket]++;
  count_++;
  sum_ += value;
}

void Histogram::write(const std::string& name, const std::string& help, std::string& out) const {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); i++) {
    cumulative += counts_[i];
    out += name + "_bucket{le=\"" + number(bounds_[i]) + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count_) + "\n";
  out += name + "_sum " + number(sum_) + "\n" + name + "_count " + std::to_string(count_) + "\n";
}

Metrics::Metrics()
    : ttft_({0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}),
      itl_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}),
      e2e_({0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}),
      batch_size_({1, 2, 4, 8, 16, 32, 64, 128, 256}) {}

void Metrics::request_finished(int64_t prompt_tokens, int64_t generated_tokens, double ttft_s, double e2e_s) {
  std::lock_guard lock(mutex_);
  requests_++;
  prompt_tokens_ += uint64_t(prompt_tokens);
  generation_tokens_ += uint64_t(generated_tokens);
  if (generated_tokens > 0) ttft_.observe(ttft_s);
  e2e_.observe(e2e_s);
}

void Metrics::inter_token_latency(double seconds) {
  std::lock_guard lock(mutex_);
  itl_.observe(seconds);
}

void Metrics::step(int64_t batch_sequences) {
  std::lock_guard lock(mutex_);
  batch_size_.observe(double(batch_sequences));
}

void Metrics::rejected(int status) {
  std::lock_guard lock(mutex_);
  (status == 429 ? queue_full_ : bad_requests_)++;
}

std::string Metrics::render(const SchedulerGauges& g) const {
  std::lock_guard lock(mutex_);
  std::string out;
  write_value("afm_requests_running", "gauge", "Requests whose sequences are in the running batch.", double(g.running), out);
  write_value("afm_requests_waiting", "gauge", "Requests queued for admission.", double(g.waiting), out);
  write_value("afm_requests_finished_total", "counter", "Requests that ran to the end or were cancelled.", double(requests_), out);
  write_value("afm_requests_rejected_queue_full_total", "counter", "Requests refused with 429: the queue was full.",
              double(queue_full_), out);
  write_value("afm_requests_rejected_invalid_total", "counter", "Requests refused with a 4xx error before running.",
              double(bad_requests_), out);
  write_value("afm_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", double(prompt_tokens_), out);
  write_value("afm_generation_tokens_total", "counter", "Tokens generated for finished requests.", double(generation_tokens_), out);
  write_value("afm_kv_blocks_used", "gauge", "KV cache blocks held by sequences or the prefix cache.", double(g.kv_blocks_used), out);
  write_value("afm_kv_blocks_free", "gauge", "KV cache blocks free in the pool.", double(g.kv_blocks_free), out);
  write_value("afm_prefix_cache_blocks", "gauge", "KV blocks recorded in the prefix cache.", double(g.prefix_cache_blocks), out);
  write_value("afm_prefix_cache_queries_total", "counter", "Prompts looked up in the prefix cache.", double(g.prefix_cache_queries), out);
  write_value("afm_prefix_cache_hits_total", "counter", "Prompts that reused at least one cached block.", double(g.prefix_cache_hits), out);
  ttft_.write("afm_time_to_first_token_seconds", "From arrival to the first generated token.", out);
  itl_.write("afm_inter_token_latency_seconds", "Between consecutive tokens of one sequence.", out);
  e2e_.write("afm_e2e_request_latency_seconds", "From arrival to the last token.", out);
  batch_size_.write("afm_batch_size", "Sequences in each forward step.", out);
  return out;
}

}  // namespace afm::server
