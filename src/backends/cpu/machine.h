// The machine's own ceilings, measured with tight loops that share nothing with afm's kernels:
// how fast memory streams into the cores, and how fast the SIMD units multiply-add. Benchmarks
// judge the kernels against these: decode against the bandwidth, prefill against the peak.
#pragma once
#include <cstdint>
#include <string>

#include "backends/cpu/thread_pool.h"

namespace afm::cpu {

// Streaming-read bandwidth in GB/s (1e9 bytes/s) of every pool thread reading its share of a
// `bytes` buffer, the best of a few passes. 0 picks 2 GiB, far beyond any cache, or a quarter of
// the available memory when that is less.
double read_bandwidth_GBps(ThreadPool& pool, int64_t bytes = 0);

struct Peak {
  std::string isa;         // the instructions measured, e.g. "avx512f" or "avx512-vnni"
  double per_thread = 0;   // G operations/s on one thread
  double all_threads = 0;  // G operations/s on every pool thread at once
};

// f32 FMA throughput in GFLOP/s (one lane's multiply-add counts 2): independent chains of
// register-only FMAs with the widest of AVX-512F, AVX2+FMA or portable code that this CPU runs.
Peak f32_fma_peak(ThreadPool& pool);

// int8 dot throughput in G ops/s (one u8×s8 multiply-add counts 2), with AVX-512 VNNI
// `vpdpbusd`, AVX-VNNI `vpdpbusd`, AVX2 `vpmaddubsw`+`vpmaddwd`, or portable code.
Peak int8_dot_peak(ThreadPool& pool);

}  // namespace afm::cpu
