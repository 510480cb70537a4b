#include "server/scheduler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "error.h"

namespace afm::server {

using Clock = std::chrono::steady_clock;

bool Request::next(std::vector<ChoiceDelta>& out, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  ready_.wait_for(lock, timeout, [&] { return finished_ || !deltas_.empty(); });
  out = std::move(deltas_);
  deltas_.clear();
  return !finished_ || !out.empty();
}

Usage Request::usage() const {
  std::lock_guard lock(mutex_);
  return usage_;
}

std::string Request::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

void Request::push(ChoiceDelta delta) {
  std::lock_guard lock(mutex_);
  deltas_.push_back(std::move(delta));
  ready_.notify_all();
}

void Request::finish(const std::string& error) {
  std::lock_guard lock(mutex_);
  finished_ = true;
  error_ = error;
  ready_.notify_all();
}

struct Scheduler::Sequence {
  std::shared_ptr<Request> request;
  std::shared_ptr<const Job> job;
  int index;  // the choice it generates
  std::unique_ptr<KVCache> cache;
  TokenGenerator generator;
  int64_t reserved_blocks;  // its worst case, counted at admission
  Clock::time_point last_token;
  std::vector<int32_t> feed;  // the tokens of this step
  bool done = false;

  bool prefilling() const { return cache->length() < int64_t(job->prompt.size()); }
  int64_t outstanding_blocks() const { return std::max<int64_t>(0, reserved_blocks - int64_t(cache->blocks().size())); }
};

Scheduler::Scheduler(Model& model, const Tokenizer& tokenizer, SchedulerOptions options, Metrics& metrics)
    : model_(model), tokenizer_(tokenizer), options_(options), metrics_(metrics), prefix_cache_(model.kv_pool()) {
  if (options_.max_batch < 1 || options_.max_queue < 0 || options_.prefill_chunk < 1)
    throw Error("scheduler: max_batch and prefill_chunk must be at least 1, max_queue at least 0");
  engine_ = std::thread([this] { run(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  engine_.join();
  for (auto& s : running_) s->request->finish("the server is shutting down");
  for (auto& w : waiting_) w.request->finish("the server is shutting down");
}

int64_t Scheduler::blocks_needed(const Job& job) const {
  const int64_t block_size = model_.kv_pool()->shape().block_size;
  const int64_t positions = std::min<int64_t>(int64_t(job.prompt.size()) + job.options.max_new_tokens, model_.max_seq_len());
  return job.n * ((positions + block_size - 1) / block_size);
}

std::shared_ptr<Request> Scheduler::submit(Job job) {
  if (job.prompt.empty()) throw Error("the prompt is empty");
  if (int64_t(job.prompt.size()) > model_.max_seq_len())
    throw Error("the prompt has " + std::to_string(job.prompt.size()) + " tokens, more than the context of " +
                std::to_string(model_.max_seq_len()));
  if (job.n < 1 || job.n > options_.max_batch)
    throw Error("n must be between 1 and the server's batch size, " + std::to_string(options_.max_batch));
  const int64_t needed = blocks_needed(job), pool = model_.kv_pool()->max_blocks();
  if (needed > pool)
    throw Error("the request needs up to " + std::to_string(needed) + " KV cache blocks but the server has " +
                std::to_string(pool) + " (ask for fewer tokens or choices)");
  auto request = std::make_shared<Request>();
  request->choices_left_ = 1;  // one sequence until the prompt is done; each fork adds one
  request->usage_.prompt_tokens = int64_t(job.prompt.size());
  {
    std::lock_guard lock(mutex_);
    if (draining_ || stop_) throw Draining("the server is shutting down");
    if (int64_t(waiting_.size()) >= options_.max_queue)
      throw QueueFull("the queue is full (" + std::to_string(options_.max_queue) + " requests waiting)");
    waiting_.push_back({request, std::move(job)});
    gauges_.waiting = int64_t(waiting_.size());
    unfinished_++;
  }
  wake_.notify_all();
  return request;
}

void Scheduler::drain() {
  std::unique_lock lock(mutex_);
  draining_ = true;
  idle_.wait(lock, [&] { return unfinished_ == 0; });
}

void Scheduler::finished_request() {
  std::lock_guard lock(mutex_);
  if (--unfinished_ == 0) idle_.notify_all();
}

SchedulerGauges Scheduler::gauges() const {
  std::lock_guard lock(mutex_);
  return gauges_;
}

void Scheduler::run() {
  while (true) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || !waiting_.empty() || !running_.empty(); });
      if (stop_) return;
    }
    drop_cancelled();
    admit();
    step();
    retire_finished();
    const std::shared_ptr<BlockPool>& pool = model_.kv_pool();
    std::lock_guard lock(mutex_);
    gauges_.running = 0;  // requests, not sequences: the choices of one request run side by side
    for (size_t i = 0; i < running_.size(); i++)
      if (running_[i]->index == 0) gauges_.running++;
    gauges_.waiting = int64_t(waiting_.size());
    gauges_.kv_blocks_free = pool->free_blocks();
    gauges_.kv_blocks_used = pool->max_blocks() - pool->free_blocks();
    gauges_.prefix_cache_blocks = prefix_cache_.blocks();
    gauges_.prefix_cache_queries = prefix_cache_.queries();
    gauges_.prefix_cache_hits = prefix_cache_.hits();
  }
}

void Scheduler::drop_cancelled() {
  for (auto& s : running_)
    if (s->request->cancelled()) s->done = true;
  std::unique_lock lock(mutex_);
  int64_t dropped = 0;
  std::erase_if(waiting_, [&](const Waiting& w) {
    if (!w.request->cancelled()) return false;
    w.request->finish("cancelled");
    metrics_.request_finished(int64_t(w.job.prompt.size()), 0, 0,
                              std::chrono::duration<double>(Clock::now() - w.request->arrival_).count());
    dropped++;
    return true;
  });
  lock.unlock();
  for (int64_t i = 0; i < dropped; i++) finished_request();
}

int64_t Scheduler::batch_slots_taken() const {
  int64_t slots = 0;  // a request still in its prompt holds a slot for each choice it will fork
  for (const auto& s : running_) slots += s->generator.generated_tokens() == 0 ? s->job->n : 1;
  return slots;
}

int64_t Scheduler::blocks_available() const {
  int64_t outstanding = 0;
  for (const auto& s : running_) outstanding += s->outstanding_blocks();
  return model_.kv_pool()->free_blocks() + prefix_cache_.evictable_blocks() - outstanding;
}

void Scheduler::admit() {
  while (true) {
    Waiting next;
    {
      std::lock_guard lock(mutex_);
      if (waiting_.empty() || batch_slots_taken() + waiting_.front().job.n > options_.max_batch) return;
      next = std::move(waiting_.front());
      waiting_.pop_front();
    }
    auto job = std::make_shared<const Job>(std::move(next.job));
    // At least the last prompt token is fed, so that its logits exist to sample from.
    const int64_t prefix_limit = int64_t(job->prompt.size()) - 1;
    const int64_t shared = prefix_cache_.shared_blocks(job->prompt, prefix_limit);
    if (blocks_needed(*job) - shared > blocks_available()) {  // the pool is full: wait at the head of the queue
      std::lock_guard lock(mutex_);
      waiting_.push_front({std::move(next.request), *job});
      return;
    }
    auto cache = model_.new_cache();
    const int64_t reused = prefix_cache_.attach(job->prompt, prefix_limit, *cache);
    next.request->usage_.cached_tokens = reused;
    running_.push_back(start_choice(next.request, job, 0, std::move(cache), blocks_needed(*job)));
  }
}

std::unique_ptr<Scheduler::Sequence> Scheduler::start_choice(std::shared_ptr<Request> request,
                                                             std::shared_ptr<const Job> job, int index,
                                                             std::unique_ptr<KVCache> cache, int64_t reserved_blocks) {
  GenerateOptions options = job->options;
  options.sampling.seed += uint64_t(index);  // choice i samples with seed + i
  TokenGenerator generator(tokenizer_, job->prompt, options, model_.max_seq_len());
  return std::unique_ptr<Sequence>(new Sequence{std::move(request), std::move(job), index, std::move(cache),
                                                std::move(generator), reserved_blocks, Clock::now(), {}});
}

void Scheduler::step() {
  std::vector<SequenceInput> batch;
  std::vector<Sequence*> order;
  // Every decoding sequence gets its token; prompts share the chunk budget, oldest first.
  for (auto& s : running_) {
    if (s->done || s->prefilling()) continue;
    s->feed.assign(1, s->generator.last_token());
    order.push_back(s.get());
  }
  int64_t budget = options_.prefill_chunk;
  for (auto& s : running_) {
    if (s->done || !s->prefilling() || budget == 0) continue;
    const auto& prompt = s->job->prompt;
    const int64_t begin = s->cache->length(), n = std::min<int64_t>(budget, int64_t(prompt.size()) - begin);
    s->feed.assign(prompt.begin() + begin, prompt.begin() + begin + n);
    budget -= n;
    order.push_back(s.get());
  }
  if (order.empty()) return;
  for (Sequence* s : order) batch.push_back({s->feed, s->cache.get()});

  metrics_.step(int64_t(order.size()));
  try {
    Tensor logits = model_.forward(batch, Logits::Last);
    for (size_t i = 0; i < order.size(); i++) {
      Sequence& s = *order[i];
      if (s.prefilling()) continue;
      const std::span<const float> row(logits.row(int64_t(i)), size_t(logits.cols));
      if (s.generator.generated_tokens() == 0) {
        prefix_cache_.insert(s.job->prompt, *s.cache);
        // The other choices of the request start here, sharing the prompt's blocks.
        const int64_t per_choice = s.reserved_blocks / s.job->n;
        s.reserved_blocks = per_choice;
        for (int c = 1; c < s.job->n; c++) {
          running_.push_back(start_choice(s.request, s.job, c, s.cache->fork(), per_choice));
          s.request->choices_left_++;
          emit(*running_.back(), row);
        }
      }
      emit(s, row);
    }
  } catch (const std::exception& e) {
    // A failure of this step fails the requests in it, never the server.
    for (Sequence* s : order) {
      s->done = true;
      s->request->cancel();
      s->request->finish(e.what());
    }
  }
}

void Scheduler::emit(Sequence& s, std::span<const float> logits) {
  ChoiceDelta delta;
  delta.index = s.index;
  delta.text = s.generator.step(logits);
  const auto now = Clock::now();
  Request& r = *s.request;
  if (s.generator.generated_tokens() == 1) {
    if (r.first_token_ == Clock::time_point()) r.first_token_ = now;
  } else {
    metrics_.inter_token_latency(std::chrono::duration<double>(now - s.last_token).count());
  }
  s.last_token = now;
  const bool eos = s.generator.finish_reason() == "eos";
  if (s.job->top_logprobs >= 0 && !eos) delta.logprobs = logprobs_of(logits, s.generator.last_token(), s.job->top_logprobs);
  if (s.generator.finished()) {
    delta.finish_reason = s.generator.finish_reason() == "length" ? "length" : "stop";
    s.done = true;
  }
  {
    std::lock_guard lock(r.mutex_);
    r.usage_.completion_tokens++;
  }
  if (!delta.text.empty() || delta.logprobs || !delta.finish_reason.empty()) r.push(std::move(delta));
}

void Scheduler::retire_finished() {
  for (auto& s : running_) {
    if (!s->done) continue;
    // Its whole text so far stays findable: the next turn of a chat starts with it.
    if (!s->request->cancelled()) prefix_cache_.insert(s->generator.tokens(), *s->cache);
    s->cache.reset();
    Request& r = *s->request;
    if (--r.choices_left_ > 0) continue;
    const auto now = Clock::now();
    const Usage usage = r.usage();
    const double ttft = r.first_token_ == Clock::time_point() ? 0 : std::chrono::duration<double>(r.first_token_ - r.arrival_).count();
    metrics_.request_finished(usage.prompt_tokens, usage.completion_tokens, ttft,
                              std::chrono::duration<double>(now - r.arrival_).count());
    if (r.error().empty()) r.finish(r.cancelled() ? "cancelled" : "");
    finished_request();
  }
  std::erase_if(running_, [](const auto& s) { return s->done; });
}

StepLogprobs Scheduler::logprobs_of(std::span<const float> logits, int32_t chosen, int top) {
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float l : logits) sum += std::exp(double(l) - max);
  const float log_total = float(max + std::log(sum));
  StepLogprobs out{{chosen, logits[size_t(chosen)] - log_total}, {}};
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  const size_t k = std::min<size_t>(size_t(top), ids.size());
  std::partial_sort(ids.begin(), ids.begin() + ptrdiff_t(k), ids.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  for (size_t i = 0; i < k; i++) out.top.push_back({ids[i], logits[size_t(ids[i])] - log_total});
  return out;
}

}  // namespace afm::server
