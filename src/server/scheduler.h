// The engine of `afm serve`: continuous batching over one model.
//
// HTTP threads submit requests and read their output from a Request; one engine thread owns the
// model, the KV pool and every sequence. Each step it
//   1. drops the sequences of cancelled requests (their clients went away), freeing their blocks;
//   2. admits waiting requests, oldest first, while the batch has room (--max-batch sequences) and
//      the pool can hold each one's worst case (prompt + max_tokens), counting what running
//      sequences may still take; a request that does not fit waits;
//   3. runs one batched forward: a token for every decoding sequence, plus chunks of prompts
//      (at most prefill_chunk tokens in all), so long prompts never stall the running streams;
//   4. samples each sequence that reached the end of its prompt, streams its text, finishes it
//      on eos, a stop string or its limit, and returns its blocks to the pool.
// Prompts are looked up in a PrefixCache first, so shared prefixes (system prompts, the earlier
// turns of a chat, the n choices of one request) are prefilled once.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "generate.h"
#include "model.h"
#include "prefix_cache.h"
#include "server/metrics.h"
#include "tokenizer.h"

namespace afm::server {

struct TokenLogprob {
  int32_t id;
  float logprob;
};

// A generated token's log-probability under the model (log-softmax of its logits) and the most
// likely alternatives, when the request asked for them.
struct StepLogprobs {
  TokenLogprob chosen;
  std::vector<TokenLogprob> top;  // most likely first
};

// One piece of one choice's output, in order. A token may bring no text (a character still
// incomplete, or held back as the possible start of a stop string); the text comes later.
struct ChoiceDelta {
  int index = 0;
  std::string text;
  std::optional<StepLogprobs> logprobs;
  std::string finish_reason;  // on the choice's last delta only: "stop" or "length"
};

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
};

// What a request asks the engine for.
struct Job {
  std::vector<int32_t> prompt;
  GenerateOptions options;  // choice i samples with seed options.sampling.seed + i
  int n = 1;
  int top_logprobs = -1;  // -1: no logprobs; k >= 0: the chosen token's and the k most likely
};

// The channel between the engine and one request's HTTP handler.
class Request {
 public:
  // Moves the deltas produced so far into `out`, waiting up to `timeout` for some; false once
  // the request is finished and everything has been read.
  bool next(std::vector<ChoiceDelta>& out, std::chrono::milliseconds timeout);
  void cancel() { cancelled_ = true; }  // the engine drops the request at its next step
  bool cancelled() const { return cancelled_; }
  Usage usage() const;
  std::string error() const;  // non-empty if the engine failed the request

 private:
  friend class Scheduler;
  void push(ChoiceDelta delta);
  void finish(const std::string& error = {});

  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<ChoiceDelta> deltas_;
  bool finished_ = false;
  std::string error_;
  Usage usage_;
  std::atomic<bool> cancelled_{false};
  std::chrono::steady_clock::time_point arrival_ = std::chrono::steady_clock::now(), first_token_;
  int choices_left_ = 0;
};

// Refusals of submit(), which the HTTP side turns into status codes.
struct QueueFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Draining : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SchedulerOptions {
  int max_batch = 16;            // sequences in one forward
  int max_queue = 64;            // requests waiting for admission; more get QueueFull
  int64_t prefill_chunk = 256;   // prompt tokens per step, over all prefilling sequences
};

class Scheduler {
 public:
  Scheduler(Model& model, const Tokenizer& tokenizer, SchedulerOptions options, Metrics& metrics);
  ~Scheduler();  // stops the engine thread; unfinished requests end with an error
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a job. Throws afm::Error for a job that can never run (more KV blocks than the pool
  // has, n over max_batch), QueueFull when max_queue requests wait, Draining after drain().
  std::shared_ptr<Request> submit(Job job);
  // Accepts nothing more, and returns once every queued and running request has finished.
  void drain();

  SchedulerGauges gauges() const;
  const SchedulerOptions& options() const { return options_; }
  int64_t blocks_needed(const Job& job) const;  // the worst case admission reserves

 private:
  struct Sequence;
  struct Waiting {
    std::shared_ptr<Request> request;
    Job job;
  };

  void run();
  void finished_request();  // one submitted request fewer to wait for in drain()
  void drop_cancelled();
  void admit();
  void step();
  // A sequence generating choice `index` of a job (sampling with seed + index) from `cache`.
  std::unique_ptr<Sequence> start_choice(std::shared_ptr<Request> request, std::shared_ptr<const Job> job, int index,
                                         std::unique_ptr<KVCache> cache, int64_t reserved_blocks);
  void emit(Sequence& s, std::span<const float> logits);
  void retire_finished();
  int64_t blocks_available() const;
  int64_t batch_slots_taken() const;
  static StepLogprobs logprobs_of(std::span<const float> logits, int32_t chosen, int top);

  Model& model_;
  const Tokenizer& tokenizer_;
  SchedulerOptions options_;
  Metrics& metrics_;
  PrefixCache prefix_cache_;

  mutable std::mutex mutex_;  // guards waiting_, the flags and gauges_
  std::condition_variable wake_, idle_;
  std::deque<Waiting> waiting_;
  bool stop_ = false, draining_ = false;
  int64_t unfinished_ = 0;  // submitted requests not yet finished
  SchedulerGauges gauges_;

  std::vector<std::unique_ptr<Sequence>> running_;  // the engine thread's alone
  std::thread engine_;
};

}  // namespace afm::server
