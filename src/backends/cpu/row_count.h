// The SIMD dot kernels are compiled once per count of activation rows (1..kMaxDotRows), so their
// accumulators stay in registers; this calls the instantiation for a count known at run time.
#pragma once
#include <string>

#include "backends/cpu/dot.h"
#include "error.h"

namespace afm::cpu {

[[noreturn]] inline void bad_row_count(const char* kernel, int n_x) {
  throw Error(std::string(kernel) + ": n_x = " + std::to_string(n_x) + ", expected 1.." + std::to_string(kMaxDotRows));
}

// Kernel<n_x>::run(args...); throws afm::Error (naming `kernel`) for n_x outside 1..kMaxDotRows.
template <template <int> class Kernel, class... Args>
void run_for_row_count(const char* kernel, int n_x, const Args&... args) {
  static_assert(kMaxDotRows == 4, "one case per row count");
  switch (n_x) {
    case 1: return Kernel<1>::run(args...);
    case 2: return Kernel<2>::run(args...);
    case 3: return Kernel<3>::run(args...);
    case 4: return Kernel<4>::run(args...);
    default: bad_row_count(kernel, n_x);
  }
}

}  // namespace afm::cpu
