// The SIMD kernels are compiled once per count of rows (activation rows, query rows), so their
// accumulators stay in registers; these call the instantiation for a count known at run time.
#pragma once
#include <string>
#include <utility>

#include "backends/cpu/dot.h"
#include "error.h"

namespace afm::cpu {

// f.template operator()<n>() for 1 <= n <= Max (a lambda with a template parameter <int N>);
// nothing for another n.
template <int Max, class F>
void with_count(int n, const F& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((n == I + 1 && (f.template operator()<I + 1>(), true)) || ...);
  }(std::make_integer_sequence<int, Max>());
}

[[noreturn]] inline void bad_row_count(const char* kernel, int n_x) {
  throw Error(std::string(kernel) + ": n_x = " + std::to_string(n_x) + ", expected 1.." + std::to_string(kMaxDotRows));
}

// Kernel<n_x>::run(args...); throws afm::Error (naming `kernel`) for n_x outside 1..kMaxDotRows.
template <template <int> class Kernel, class... Args>
void run_for_row_count(const char* kernel, int n_x, const Args&... args) {
  if (n_x < 1 || n_x > kMaxDotRows) bad_row_count(kernel, n_x);
  with_count<kMaxDotRows>(n_x, [&]<int N>() { Kernel<N>::run(args...); });
}

}  // namespace afm::cpu
