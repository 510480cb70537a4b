// What `afm serve` counts, in Prometheus' text exposition format (GET /metrics): counters, gauges
// read at scrape time, and histograms with fixed buckets. Thread-safe: the scheduler's thread
// records, HTTP threads scrape.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace afm::server {

class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds) : bounds_(std::move(upper_bounds)), counts_(bounds_.size()) {}
  void observe(double value);
  // The histogram's lines (cumulative _bucket{le=...}, _sum, _count) under `name`.
  void write(const std::string& name, const std::string& help, std::string& out) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative
  uint64_t count_ = 0;
  double sum_ = 0;
};

// Gauges the scheduler reports when scraped.
struct SchedulerGauges {
  int64_t running = 0, waiting = 0;
  int64_t kv_blocks_used = 0, kv_blocks_free = 0, prefix_cache_blocks = 0;
  int64_t prefix_cache_queries = 0, prefix_cache_hits = 0;
};

class Metrics {
 public:
  Metrics();
  void request_finished(int64_t prompt_tokens, int64_t generated_tokens, double ttft_s, double e2e_s);
  void inter_token_latency(double seconds);
  void step(int64_t batch_sequences);
  void rejected(int status);  // a request refused (429, 4xx) before it reached the model
  std::string render(const SchedulerGauges& gauges) const;

 private:
  mutable std::mutex mutex_;
  uint64_t prompt_tokens_ = 0, generation_tokens_ = 0, requests_ = 0, queue_full_ = 0, bad_requests_ = 0;
  Histogram ttft_, itl_, e2e_, batch_size_;
};

}  // namespace afm::server
