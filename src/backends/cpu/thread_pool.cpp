#include "backends/cpu/thread_pool.h"

#include <algorithm>
#include <stdexcept>

namespace afm::cpu {

namespace {

// Tens of microseconds to about a millisecond of polling, depending on the CPU's `pause`: long
// enough to catch the next op of a forward pass, short enough to yield a contended core soon.
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
  for (uint64_t cursor = cursor_.load(std::memory_order_acquire); (cursor >> 32) == job;) {
    const int64_t index = int64_t(cursor & kClosed), chunks = chunks_.load(std::memory_order_relaxed);
    if (index >= chunks) return;  // all claimed, or closed
    if (!cursor_.compare_exchange_weak(cursor, cursor + 1, std::memory_order_acq_rel)) continue;
    // Claimed: the job cannot finish before this chunk does, so the fields read are this job's.
    const int64_t n = n_.load(std::memory_order_relaxed), chunk = chunk_.load(std::memory_order_relaxed);
    (*body_.load(std::memory_order_relaxed))(index * chunk, std::min(n, index * chunk + chunk));
    if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) done_.notify_all();
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
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (chunks >= int64_t(kClosed)) throw std::length_error("ThreadPool: too many chunks");
  body_.store(&body, std::memory_order_relaxed);
  n_.store(n, std::memory_order_relaxed);
  chunk_.store(chunk, std::memory_order_relaxed);
  chunks_.store(chunks, std::memory_order_relaxed);
  done_.store(0);
  job_ = (job_ + 1) & 0xffffffffu;
  cursor_.store(job_ << 32, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  run_chunks(job_);
  spin_then_wait(done_, [&](int64_t done) { return done == chunks; });
  // Close the job before its fields are reused: a worker still holding an old cursor value now
  // fails its claim instead of reading the next job's chunk count.
  cursor_.store((job_ << 32) | kClosed, std::memory_order_release);
}

}  // namespace afm::cpu
