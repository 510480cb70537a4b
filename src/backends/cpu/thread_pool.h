// A fixed pool of worker threads for the CPU backend's parallel loops. Idle workers spin briefly,
// then sleep on a futex, so back-to-back ops start fast while a busy machine loses no core to
// spinning (OpenMP's default spin-waiting made a shared 2-core machine 10x slower).
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace afm::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);  // 0: one per hardware thread
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }  // the calling thread works too

  // Calls body(begin, end) on chunks of [0, n) of at most `chunk` items, spread over the pool,
  // or once on all of [0, n) when there is a single chunk or thread; returns when all are done.
  void parallel_for(int64_t n, int64_t chunk, const std::function<void(int64_t begin, int64_t end)>& body);

 private:
  void worker_loop();
  void run_chunks();

  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t n_ = 0, chunk_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<uint32_t> generation_{0};  // bumped to start a job
  std::atomic<int> busy_{0};             // workers still in the current job
  std::atomic<bool> stop_{false};
};

}  // namespace afm::cpu
