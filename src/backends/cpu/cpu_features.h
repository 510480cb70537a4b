// CPU features read straight from CPUID, for the ones clang 14's __builtin_cpu_supports does not
// know ("f16c", "avxvnni"); the rest of the dispatch asks __builtin_cpu_supports.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

namespace afm::cpu {

inline bool cpu_has_f16c() {  // leaf 1, ECX bit 29
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}

inline bool cpu_has_avx_vnni() {  // leaf 7 subleaf 1, EAX bit 4
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
}

// Leaf 0's vendor string, for tuning that measurements showed to differ between vendors.
inline bool cpu_is_intel() {
  unsigned a, b, c, d;
  return __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;  // "GenuineIntel"
}

}  // namespace afm::cpu
#endif
