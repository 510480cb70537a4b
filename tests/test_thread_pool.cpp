// The CPU backend's thread pool: every item exactly once, many jobs back to back, no lost wake-ups.
#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <vector>

#include "backends/cpu/thread_pool.h"

namespace {

TEST(ThreadPool, CoversEveryItemOnceAcrossManyJobs) {
  for (int threads : {1, 2, 4}) {
    afm::cpu::ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    // Thousands of tiny jobs in a row: the pattern of a decode step, and where a lost wake-up hangs.
    for (int job = 0; job < 20000; job++) {
      const int64_t n = 1 + job % 97;
      std::vector<std::atomic<int>> hits(n);
      pool.parallel_for(n, 1 + job % 5, [&](int64_t begin, int64_t end) {
        if (threads > 1) {
          EXPECT_LE(end - begin, 1 + job % 5);
        }
        for (int64_t i = begin; i < end; i++) hits[i]++;
      });
      for (int64_t i = 0; i < n; i++) ASSERT_EQ(hits[i].load(), 1) << "job " << job << " item " << i;
    }
  }
}

TEST(ThreadPool, UsesTheWorkers) {
  afm::cpu::ThreadPool pool(2);
  std::atomic<int> chunks{0};
  std::vector<int64_t> sums(1000);
  pool.parallel_for(1000, 10, [&](int64_t begin, int64_t end) {
    chunks++;
    for (int64_t i = begin; i < end; i++) sums[i] = i;
  });
  EXPECT_EQ(chunks.load(), 100);
  EXPECT_EQ(std::accumulate(sums.begin(), sums.end(), int64_t(0)), 999 * 1000 / 2);
}

}  // namespace
