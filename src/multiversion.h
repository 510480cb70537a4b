// Load-time loops (weight conversion, random weights) are worth a vectorized build per ISA:
// GCC and clang compile one clone per target and the dynamic linker picks the one this CPU runs,
// so the library still needs no -march flags.
#pragma once

#if defined(__x86_64__) && !defined(__clang__)
#define AFM_VECTORIZED_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__)
#define AFM_VECTORIZED_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AFM_VECTORIZED_CLONES
#endif
