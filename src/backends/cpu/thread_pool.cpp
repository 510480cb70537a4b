#include "backends/cpu/thread_pool.h"

#include <algorithm>

namespace afm::cpu {

namespace {

// About 20-50 microseconds of polling: long enough to catch the next op of a forward pass.
constexpr int kSpinIterations = 20000;

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

void ThreadPool::run_chunks() {
  for (int64_t begin = next_.fetch_add(chunk_); begin < n_; begin = next_.fetch_add(chunk_))
    (*body_)(begin, std::min(n_, begin + chunk_));
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;
  while (true) {
    spin_then_wait(generation_, [&](uint32_t generation) { return generation != seen; });
    seen = generation_.load(std::memory_order_acquire);
    if (stop_.load()) return;
    run_chunks();
    if (busy_.fetch_sub(1, std::memory_order_acq_rel) == 1) busy_.notify_one();
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(chunk, 1);
  if (workers_.empty() || n <= chunk) return body(0, n);
  body_ = &body;
  n_ = n;
  chunk_ = chunk;
  next_.store(0);
  busy_.store(int(workers_.size()));
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  run_chunks();
  spin_then_wait(busy_, [](int busy) { return busy == 0; });
}

}  // namespace afm::cpu
