// The prefill matmul. Each thread takes a block of weight rows and, for one slice of kDepth
// columns at a time, decodes that block into panels of 2 vectors' worth of rows (32 with
// AVX-512, 16 with AVX2) laid out column-major ([k][row]) in a buffer that stays in L2; then
// every tile of tokens runs over every panel. A micro-kernel holds a tile of up to 12 (AVX2: 6)
// tokens x one panel's rows in registers: per column it loads the panel's column (2 vectors) and
// broadcasts each token's x, one broadcast per 2 vector FMAs, so the FMA units, not the loads,
// bound it; its output tile is contiguous in `out`. bench_gemm measured it at 80-100% of one
// core's FMA peak at 128 and 512 tokens.
#include "backends/cpu/gemm.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "backends/cpu/simd.h"
#include "backends/cpu/panels.h"
#include "error.h"

namespace afm::cpu {

namespace {

constexpr int64_t kDepth = 128;           // columns decoded at a time (panel: 16 KB in L1)
constexpr int64_t kBlockRows = 256;       // weight rows a thread decodes at a time (at most)
constexpr int64_t kTransposeTile = 16;    // panels are packed from 16 x 16 tiles of 32-bit words

// A micro-kernel: out[t][r] (+)= sum_{i < depth} x[t][i] * panel[i][r] for t < tokens (its
// template count) and r < the panel's rows, writing only rows below `rows`.
using MicroFn = void (*)(const float* x, int64_t x_stride, const float* panel, int64_t depth, float* out,
                         int64_t out_stride, int64_t rows, bool accumulate);

// One implementation of the scheme for an ISA: its panel width, its largest token tile, and its
// micro-kernels by token count (index tokens - 1).
struct Family {
  int64_t panel_rows;
  int max_tokens;
  const MicroFn* micro;
  // Packs rows [0, panel_rows) of `rows_f32` (row stride `stride`; columns [0, columns), a
  // multiple of 16, zero-padded) into `panel` as [column][row].
  void (*pack)(const float* rows_f32, int64_t stride, int64_t columns, int64_t panel_rows, float* panel);
};

void pack_scalar(const float* src, int64_t stride, int64_t columns, int64_t panel_rows, float* dst) {
  for (int64_t c = 0; c < columns; c++)
    for (int64_t r = 0; r < panel_rows; r++) dst[c * panel_rows + r] = src[r * stride + c];
}

#ifdef AFM_X86

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see dot.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int Tokens>
AFM_AVX512 void micro_avx512(const float* x, int64_t x_stride, const float* panel, int64_t depth, float* out,
                             int64_t out_stride, int64_t rows, bool accumulate) {
  __m512 acc[Tokens][2];
#pragma GCC unroll 12
  for (int t = 0; t < Tokens; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < depth; i++) {
    const __m512 w0 = _mm512_loadu_ps(panel + 32 * i), w1 = _mm512_loadu_ps(panel + 32 * i + 16);
#pragma GCC unroll 12
    for (int t = 0; t < Tokens; t++) {
      const __m512 b = _mm512_set1_ps(x[t * x_stride + i]);
      acc[t][0] = _mm512_fmadd_ps(w0, b, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(w1, b, acc[t][1]);
    }
  }
#pragma GCC unroll 12
  for (int t = 0; t < Tokens; t++) store_panel_row(out + t * out_stride, acc[t][0], acc[t][1], rows, accumulate);
}

AFM_AVX512 void pack_avx512(const float* src, int64_t stride, int64_t columns, int64_t panel_rows, float* dst) {
  for (int64_t c = 0; c < columns; c += kTransposeTile)
    for (int64_t r = 0; r < panel_rows; r += kTransposeTile)
      transpose16(src + r * stride + c, stride, dst + c * panel_rows + r, panel_rows);
}

template <int Tokens>
AFM_AVX2 void micro_avx2(const float* x, int64_t x_stride, const float* panel, int64_t depth, float* out,
                         int64_t out_stride, int64_t rows, bool accumulate) {
  __m256 acc[Tokens][2];
#pragma GCC unroll 6
  for (int t = 0; t < Tokens; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < depth; i++) {
    const __m256 w0 = _mm256_loadu_ps(panel + 16 * i), w1 = _mm256_loadu_ps(panel + 16 * i + 8);
#pragma GCC unroll 6
    for (int t = 0; t < Tokens; t++) {
      const __m256 b = _mm256_broadcast_ss(x + t * x_stride + i);
      acc[t][0] = _mm256_fmadd_ps(w0, b, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, b, acc[t][1]);
    }
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(rows, 16))), lane);
  const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(rows, 16)) - 8), lane);
#pragma GCC unroll 6
  for (int t = 0; t < Tokens; t++) {
    float* o = out + t * out_stride;
    if (accumulate) {
      acc[t][0] = _mm256_add_ps(acc[t][0], _mm256_maskload_ps(o, m0));
      acc[t][1] = _mm256_add_ps(acc[t][1], _mm256_maskload_ps(o + 8, m1));
    }
    _mm256_maskstore_ps(o, m0, acc[t][0]);
    _mm256_maskstore_ps(o + 8, m1, acc[t][1]);
  }
}

#pragma GCC diagnostic pop

template <template <int> class Kernel, size_t... I>
constexpr std::array<MicroFn, sizeof...(I)> micro_table(std::index_sequence<I...>) {
  return {Kernel<int(I) + 1>::fn...};
}
template <int T> struct Avx512Micro { static constexpr MicroFn fn = micro_avx512<T>; };
template <int T> struct Avx2Micro { static constexpr MicroFn fn = micro_avx2<T>; };

constexpr auto kAvx512Micro = micro_table<Avx512Micro>(std::make_index_sequence<12>());
constexpr auto kAvx2Micro = micro_table<Avx2Micro>(std::make_index_sequence<6>());

#endif  // AFM_X86

Family family(Isa isa) {
#ifdef AFM_X86
  if (isa == Isa::Avx512 || isa == Isa::Avx512Vnni) return {32, 12, kAvx512Micro.data(), pack_avx512};
  if (isa == Isa::Avx2) return {16, 6, kAvx2Micro.data(), pack_scalar};
#endif
  throw Error(std::string("gemm: no kernels for ") + isa_name(isa));
}

// One thread's work on weight rows [n0, n0 + rows): decode, pack, multiply, slice by slice.
void gemm_block(const Weight& w, const Family& f, DecodeFn decode, const float* x, int64_t T, float* out,
                int64_t n0, int64_t rows) {
  const int64_t K = w.cols, N = w.rows;
  const int64_t panels = (rows + f.panel_rows - 1) / f.panel_rows;
  const int64_t padded_rows = panels * f.panel_rows;
  thread_local std::vector<float> decoded, packed;  // [padded_rows][kDepth], [panels][depth][panel_rows]
  decoded.assign(padded_rows * kDepth, 0.0f);
  packed.resize(padded_rows * kDepth);
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t cols = std::min(kDepth, K - k0), padded_cols = round_up(cols, kTransposeTile);
    for (int64_t r = 0; r < rows; r++) {
      float* row = decoded.data() + r * kDepth;
      decode(w.data + (n0 + r) * w.row_bytes, K, k0, cols, row);
      std::fill(row + cols, row + padded_cols, 0.0f);
    }
    const int64_t panel_floats = padded_cols * f.panel_rows;
    for (int64_t p = 0; p < panels; p++)
      f.pack(decoded.data() + p * f.panel_rows * kDepth, kDepth, padded_cols, f.panel_rows,
             packed.data() + p * panel_floats);
    for (int64_t t0 = 0; t0 < T; t0 += f.max_tokens) {
      const int tokens = int(std::min<int64_t>(f.max_tokens, T - t0));
      for (int64_t p = 0; p < panels; p++) {
        const int64_t r0 = p * f.panel_rows;
        f.micro[tokens - 1](x + t0 * K + k0, K, packed.data() + p * panel_floats, cols, out + t0 * N + n0 + r0, N,
                            rows - r0, k0 > 0);
      }
    }
  }
}

}  // namespace

bool gemm_supported(Isa isa) { return isa != Isa::Scalar && isa_supported(isa); }

void gemm(const Weight& w, const float* x, int64_t T, float* out, ThreadPool& pool, Isa isa) {
  if (!gemm_supported(isa)) throw Error(std::string("gemm: no kernels for ") + isa_name(isa) + " on this CPU");
  const Family f = family(isa);
  const DecodeFn decode = decode_kernel(w.format, isa);
  for_each_row_block(pool, w.rows, f.panel_rows, kBlockRows, T * w.rows * w.cols,
                     [&](int64_t n0, int64_t rows) { gemm_block(w, f, decode, x, T, out, n0, rows); });
}

}  // namespace afm::cpu
