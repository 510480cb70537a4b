// The matmul of a prefill or a batch of decode rows: out[t][n] = sum_k x[t][k] * W[n][k] for many
// tokens t at once, as a register-blocked kernel over packed weight panels (GotoBLAS's scheme).
// The dot kernels (dot.h) decode each weight once per group of 4 tokens; here it is decoded
// once per call into a cache-sized buffer and reused by every token.
#pragma once
#include <cstdint>

#include "backends/cpu/dot.h"
#include "backends/cpu/thread_pool.h"
#include "weight.h"

namespace afm::cpu {

// From this many tokens on, gemm beats the dot kernels (bench_kernels).
constexpr int64_t kGemmMinTokens = 16;

// Whether gemm has kernels for `isa` (any SIMD ISA; the scalar one runs the dot kernels).
bool gemm_supported(Isa isa);

// out (T rows of w.rows floats) = x (T rows of w.cols floats) @ w^T, with the weights decoded
// exactly to f32 and f32 FMAs: the dot kernels' sums in another order. (AVX-512 BF16's
// `vdpbf16ps` would take bf16 pairs, but measured half the f32 FMA rate on a Sapphire Rapids
// class Xeon, docs/PERFORMANCE.md.) Throws when !gemm_supported.
void gemm(const Weight& w, const float* x, int64_t T, float* out, ThreadPool& pool, Isa isa = best_isa());

}  // namespace afm::cpu
