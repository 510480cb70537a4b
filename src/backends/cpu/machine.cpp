// Machine ceilings from tight loops. Each SIMD loop has per-function target attributes (no -march
// flags) and is picked at run time from what the CPU reports, like the kernels in dot.cpp.
#include "backends/cpu/machine.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>

#include "backends/cpu/cpu_features.h"
#include "weight.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AFM_X86 1
#define AFM_AVX2 __attribute__((target("avx2,fma")))
#define AFM_AVX512 __attribute__((target("avx512f")))
#define AFM_AVX_VNNI __attribute__((target("avx2,avxvnni")))
#define AFM_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif

namespace afm::cpu {

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kPasses = 3;  // best of: the fastest pass is the one least disturbed by the OS

// Results of the loops land here, so the compiler cannot drop the work that produced them.
std::atomic<uint64_t> sink{0};

double seconds_of(const std::function<void()>& pass) {
  const auto start = Clock::now();
  pass();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double best_seconds(const std::function<void()>& pass) {
  double best = 1e30;
  for (int i = 0; i < kPasses; i++) best = std::min(best, seconds_of(pass));
  return best;
}

// ---- streaming read ----

uint64_t read_portable(const uint8_t* p, int64_t bytes) {
  uint64_t s[4] = {0, 0, 0, 0}, v[4];
  for (int64_t i = 0; i < bytes; i += sizeof v) {
    std::memcpy(v, p + i, sizeof v);
    for (int j = 0; j < 4; j++) s[j] += v[j];
  }
  return s[0] + s[1] + s[2] + s[3];
}

#ifdef AFM_X86
AFM_AVX2 uint64_t read_avx2(const uint8_t* p, int64_t bytes) {
  __m256i s[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  for (int64_t i = 0; i < bytes; i += 128)
    for (int j = 0; j < 4; j++)
      s[j] = _mm256_add_epi64(s[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32 * j)));
  const __m256i t = _mm256_add_epi64(_mm256_add_epi64(s[0], s[1]), _mm256_add_epi64(s[2], s[3]));
  // Summed as unsigned: the sink wraps, where a signed sum would be undefined (found by UBSan).
  return uint64_t(_mm256_extract_epi64(t, 0)) + uint64_t(_mm256_extract_epi64(t, 1)) +
         uint64_t(_mm256_extract_epi64(t, 2)) + uint64_t(_mm256_extract_epi64(t, 3));
}
#endif

// ---- compute: independent accumulator chains, enough to cover each instruction's latency on
// every SIMD port, and few enough to stay in registers (16 ymm or 32 zmm) ----

// A loop, run for `iterations`, doing `ops_per_iteration` operations each time; it returns a
// value to sink.
struct Loop {
  const char* isa;
  double ops_per_iteration;
  uint64_t (*run)(int64_t iterations);
};

constexpr int kPortableChains = 8;
uint64_t fma_portable(int64_t iterations) {
  float acc[kPortableChains];
  for (int c = 0; c < kPortableChains; c++) acc[c] = float(c);
  for (int64_t i = 0; i < iterations; i++)
    for (int c = 0; c < kPortableChains; c++) acc[c] = acc[c] * 0.999f + 1e-3f;  // converges to 1: no denormals
  float sum = 0;
  for (float a : acc) sum += a;
  return std::bit_cast<uint32_t>(sum);
}

uint64_t int8_portable(int64_t iterations) {
  int32_t acc[kPortableChains] = {};
  int8_t a = 3, b = 5;
  for (int64_t i = 0; i < iterations; i++) {
    asm volatile("" : "+r"(a));  // hides that `a` is constant, so the products are not hoisted
    for (int c = 0; c < kPortableChains; c++) acc[c] += int32_t(int8_t(a + c)) * b;
  }
  int32_t sum = 0;
  for (int32_t v : acc) sum += v;
  return uint32_t(sum);
}

#ifdef AFM_X86
constexpr int kYmmChains = 12, kZmmChains = 16;

AFM_AVX2 uint64_t fma_avx2(int64_t iterations) {
  __m256 acc[kYmmChains];
  for (int c = 0; c < kYmmChains; c++) acc[c] = _mm256_set1_ps(float(c));
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  for (int64_t i = 0; i < iterations; i++)
#pragma GCC unroll 16
    for (int c = 0; c < kYmmChains; c++) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  __m256 sum = acc[0];
  for (int c = 1; c < kYmmChains; c++) sum = _mm256_add_ps(sum, acc[c]);
  return std::bit_cast<uint32_t>(_mm256_cvtss_f32(sum));
}

AFM_AVX512 uint64_t fma_avx512(int64_t iterations) {
  __m512 acc[kZmmChains];
  for (int c = 0; c < kZmmChains; c++) acc[c] = _mm512_set1_ps(float(c));
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  for (int64_t i = 0; i < iterations; i++)
#pragma GCC unroll 16
    for (int c = 0; c < kZmmChains; c++) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  __m512 sum = acc[0];
  for (int c = 1; c < kZmmChains; c++) sum = _mm512_add_ps(sum, acc[c]);
  return std::bit_cast<uint32_t>(_mm512_cvtss_f32(sum));  // one lane is enough to sink
}

// maddubs+madd+add has no loop-carried latency but the 1-cycle add, so 6 chains keep both
// multiply ports busy. The s8 operand goes through an empty asm every iteration, so the compiler
// cannot hoist the (otherwise loop-invariant) products out of the loop.
constexpr int kMaddChains = 6;
AFM_AVX2 uint64_t int8_avx2(int64_t iterations) {
  __m256i acc[kMaddChains], u[kMaddChains];
  for (int c = 0; c < kMaddChains; c++) acc[c] = _mm256_setzero_si256(), u[c] = _mm256_set1_epi8(char(1 + c));
  __m256i s = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < iterations; i++) {
    asm volatile("" : "+x"(s));
#pragma GCC unroll 8
    for (int c = 0; c < kMaddChains; c++)
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(u[c], s), ones));
  }
  __m256i sum = acc[0];
  for (int c = 1; c < kMaddChains; c++) sum = _mm256_add_epi32(sum, acc[c]);
  return uint32_t(_mm256_extract_epi32(sum, 0));
}

AFM_AVX_VNNI uint64_t int8_avx_vnni(int64_t iterations) {
  __m256i acc[kYmmChains];
  for (int c = 0; c < kYmmChains; c++) acc[c] = _mm256_set1_epi32(c);
  const __m256i u = _mm256_set1_epi8(1), s = _mm256_set1_epi8(3);
  for (int64_t i = 0; i < iterations; i++)
#pragma GCC unroll 16
    for (int c = 0; c < kYmmChains; c++) acc[c] = _mm256_dpbusd_avx_epi32(acc[c], u, s);
  __m256i sum = acc[0];
  for (int c = 1; c < kYmmChains; c++) sum = _mm256_add_epi32(sum, acc[c]);
  return uint32_t(_mm256_extract_epi32(sum, 0));
}

AFM_AVX512_VNNI uint64_t int8_avx512_vnni(int64_t iterations) {
  __m512i acc[kZmmChains];
  for (int c = 0; c < kZmmChains; c++) acc[c] = _mm512_set1_epi32(c);
  const __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(3);
  for (int64_t i = 0; i < iterations; i++)
#pragma GCC unroll 16
    for (int c = 0; c < kZmmChains; c++) acc[c] = _mm512_dpbusd_epi32(acc[c], u, s);
  __m512i sum = acc[0];
  for (int c = 1; c < kZmmChains; c++) sum = _mm512_add_epi32(sum, acc[c]);
  return uint32_t(_mm512_cvtsi512_si32(sum));  // one lane is enough to sink
}

#endif

// The widest loops this CPU runs; ops count 2 per lane multiply-add.
Loop best_fma_loop() {
#ifdef AFM_X86
  if (__builtin_cpu_supports("avx512f")) return {"avx512f", 2.0 * 16 * kZmmChains, fma_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {"avx2+fma", 2.0 * 8 * kYmmChains, fma_avx2};
#endif
  return {"portable", 2.0 * kPortableChains, fma_portable};
}

Loop best_int8_loop() {
#ifdef AFM_X86
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
    return {"avx512-vnni vpdpbusd", 2.0 * 64 * kZmmChains, int8_avx512_vnni};
  if (cpu_has_avx_vnni()) return {"avx-vnni vpdpbusd", 2.0 * 32 * kYmmChains, int8_avx_vnni};
  if (__builtin_cpu_supports("avx2")) return {"avx2 vpmaddubsw+vpmaddwd", 2.0 * 32 * kMaddChains, int8_avx2};
#endif
  return {"portable", 2.0 * kPortableChains, int8_portable};
}

Peak measure(const Loop& loop, ThreadPool& pool) {
  // Lengthen a run until it takes 20 ms, so that timer and wake-up costs vanish.
  int64_t iterations = 1 << 12;
  while (seconds_of([&] { sink ^= loop.run(iterations); }) < 0.02) iterations *= 2;
  const double gops_per_run = loop.ops_per_iteration * double(iterations) / 1e9;
  Peak peak;
  peak.isa = loop.isa;
  peak.per_thread = gops_per_run / best_seconds([&] { sink ^= loop.run(iterations); });
  // Several runs per thread, so one thread that the OS delays costs only part of a run.
  const int64_t runs = 4 * pool.size();
  peak.all_threads = runs * gops_per_run / best_seconds([&] {
    pool.parallel_for(runs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; r++) sink ^= loop.run(iterations);
    });
  });
  return peak;
}

}  // namespace

double read_bandwidth_GBps(ThreadPool& pool, int64_t bytes) {
  constexpr int64_t kChunk = 1 << 20, kDefault = int64_t(2) << 30, kFloor = int64_t(256) << 20;
  if (bytes <= 0) {
    const int64_t free_bytes = int64_t(sysconf(_SC_AVPHYS_PAGES)) * sysconf(_SC_PAGESIZE);
    bytes = std::min(kDefault, std::max(kFloor, free_bytes / 4));
  }
  const int64_t chunks = std::max<int64_t>(1, bytes / kChunk);
  // Written before it is read, so every page is backed by memory (never-written pages all map to
  // the kernel's zero page, which reads from cache); written by the threads that later read it.
  // In the memory that weights are streamed from, so the floor is the same reads' bandwidth.
  const std::shared_ptr<uint8_t[]> buffer = allocate_streamed(chunks * kChunk);
  pool.parallel_for(chunks, 1, [&](int64_t begin, int64_t end) {
    std::memset(buffer.get() + begin * kChunk, 1, (end - begin) * kChunk);
  });
  uint64_t (*read)(const uint8_t*, int64_t) = read_portable;
#ifdef AFM_X86
  if (__builtin_cpu_supports("avx2")) read = read_avx2;
#endif
  const double seconds = best_seconds([&] {
    pool.parallel_for(chunks, 1, [&](int64_t begin, int64_t end) {
      sink ^= read(buffer.get() + begin * kChunk, (end - begin) * kChunk);
    });
  });
  return double(chunks * kChunk) / seconds / 1e9;
}

Peak f32_fma_peak(ThreadPool& pool) { return measure(best_fma_loop(), pool); }
Peak int8_dot_peak(ThreadPool& pool) { return measure(best_int8_loop(), pool); }

}  // namespace afm::cpu
