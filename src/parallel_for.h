// Load-time work split over every core with plain threads: converting or generating weights
// runs once per tensor, before any backend (and its thread pool) exists.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace afm {

// Calls body(begin, end) on disjoint ranges that cover [0, n), one per thread, with at least
// `min_per_thread` items each. An exception from any thread is rethrown here.
template <class Body>
void parallel_for(int64_t n, int64_t min_per_thread, const Body& body) {
  const int64_t num_threads =
      std::clamp<int64_t>(std::thread::hardware_concurrency(), 1, std::max<int64_t>(1, n / min_per_thread));
  std::vector<std::exception_ptr> failures(num_threads);
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < num_threads; t++) {
    threads.emplace_back([&, t] {
      try {
        body(t * n / num_threads, (t + 1) * n / num_threads);
      } catch (...) {
        failures[t] = std::current_exception();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& failure : failures)
    if (failure) std::rethrow_exception(failure);
}

}  // namespace afm
