// A fixed pool of worker threads for the CPU backend's parallel loops. Idle workers spin briefly,
// then sleep on a futex, so back-to-back ops start fast while a busy machine loses no core to
// spinning; and a job never waits for a worker the OS has not scheduled.
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
  // The same, but on the calling thread alone when the loop does under about 65k multiply-adds
  // in all: one thread finishes such a loop before the others could start.
  void parallel_for(int64_t n, int64_t chunk, int64_t multiply_adds,
                    const std::function<void(int64_t begin, int64_t end)>& body) {
    if (multiply_adds < (int64_t(1) << 16)) return body(0, n);
    parallel_for(n, chunk, body);
  }

 private:
  void worker_loop();
  void run_chunks(uint64_t job);

  std::vector<std::thread> workers_;
  // The current job. A chunk is claimed by advancing `cursor_`, whose high half names the job,
  // so a worker that wakes late can never claim a chunk of a job that already finished; the
  // caller waits only for chunks actually claimed, never for a descheduled worker to check in.
  // Written by the caller between jobs, read by workers after they claim a chunk; atomic (relaxed)
  // because a late worker may read them while the caller sets up the next job, then fail its claim.
  std::atomic<const std::function<void(int64_t, int64_t)>*> body_{nullptr};
  std::atomic<int64_t> n_{0}, chunk_{1}, chunks_{0};
  uint64_t job_ = 0;                     // written by the calling thread only
  std::atomic<uint64_t> cursor_{0xffffffffu};  // (job << 32) | next chunk; closed between jobs
  std::atomic<int64_t> done_{0};         // chunks of the current job finished
  std::atomic<uint32_t> generation_{0};  // bumped to wake the workers
  std::atomic<bool> stop_{false};
};

}  // namespace afm::cpu
