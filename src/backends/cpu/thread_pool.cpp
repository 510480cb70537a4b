#include "backends/cpu/thread_pool.h"

#include <algorithm>
#include <stdexcept>

namespace afm::cpu {

namespace {

// About 20-50 microseconds of polling: long enough to catch the next op of a forward pass.
constexpr int kSpinIterations = 20000;
constexpr uint64_t kClosed = 0xffffffffu;  // chunk index of a finished job

// Polls `value` until ready(value), then sleeps on it between changes.
template <typename T, typename Ready>
void spin_then_wait(const std::atomic<T>& value, Ready ready) {
  for (int i = 0; i < kSpinIterations; i++) {
    if (ready(value.load(std::memory_order_acquire))) return;
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  for (T current = value.load(std::memory_order_acquire); !ready(current); current = value.load(std::memory_order_acquire))
    value.wait(current, std::memory_order_acquire);  // sleeps only while the value is still `current`
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < num_threads; i++) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::run_chunks(uint64_t job) {
  uint64_t cursor = cursor_.load(std::memory_order_acquire);
  while ((cursor >> 32) == job && int64_t(cursor & 0xffffffffu) < chunks_) {
    if (!cursor_.compare_exchange_weak(cursor, cursor + 1, std::memory_order_acq_rel)) continue;
    // Claimed: the job cannot finish before this chunk does, so its fields stay valid.
    const int64_t begin = int64_t(cursor & 0xffffffffu) * chunk_;
    (*body_)(begin, std::min(n_, begin + chunk_));
    if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks_) done_.notify_all();
    cursor = cursor_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;
  while (true) {
    spin_then_wait(generation_, [&](uint32_t generation) { return generation != seen; });
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    run_chunks(cursor_.load(std::memory_order_acquire) >> 32);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  if (workers_.empty() || n <= chunk) return body(0, n);
  body_ = &body;
  n_ = n;
  chunk_ = chunk;
  chunks_ = (n + chunk - 1) / chunk;
  if (chunks_ >= int64_t(kClosed)) throw std::length_error("ThreadPool: too many chunks");
  done_.store(0);
  job_ = (job_ + 1) & 0xffffffffu;
  cursor_.store(job_ << 32, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  run_chunks(job_);
  spin_then_wait(done_, [&](int64_t done) { return done == chunks_; });
  // Close the job before its fields are reused: a worker still holding an old cursor value now
  // fails its claim instead of reading the next job's chunk count.
  cursor_.store((job_ << 32) | kClosed, std::memory_order_release);
}

}  // namespace afm::cpu
