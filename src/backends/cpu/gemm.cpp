// The prefill matmul. Each thread takes a block of weight rows and, for one slice of kDepth
// columns at a time, decodes that block into panels of kPanelRows rows laid out column-major
// ([k][row]) in a buffer that stays in L2; then every tile of tokens runs over every panel. A
// micro-kernel holds a tile of up to 12 tokens x one panel's rows in registers: per column it
// loads the panel's column (2 vectors) and broadcasts each token's x, so it does 2 loads plus
// one broadcast per 2 multiply-add vectors, and its output tile is contiguous in `out`.
#include "backends/cpu/gemm.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

#include "backends/cpu/simd.h"
#include "error.h"

namespace afm::cpu {

namespace {

constexpr int64_t kDepth = 256;           // columns decoded at a time
constexpr int64_t kBlockRows = 256;       // weight rows a thread decodes at a time (at most)
constexpr int64_t kTransposeTile = 16;    // panels are packed from 16 x 16 tiles of 32-bit words

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A micro-kernel: out[t][r] (+)= sum_{i < depth} x[t][i] * panel[i][r] for t < tokens (its
// template count) and r < the panel's rows, writing only rows below `rows`. In the bf16 variant
// an x "element" and a panel entry are pairs of bf16 along k, so depth counts pairs.
using MicroFn = void (*)(const void* x, int64_t x_stride, const void* panel, int64_t depth, float* out,
                         int64_t out_stride, int64_t rows, bool accumulate);

// One implementation of the scheme for an ISA: its panel width, its largest token tile, whether
// it works on bf16 pairs, and its micro-kernels by token count (index tokens - 1).
struct Family {
  int64_t panel_rows;
  int max_tokens;
  bool bf16;
  const MicroFn* micro;
  // Packs the panel of rows [0, panel_rows) of `rows_f32` (row stride `stride` floats, columns
  // [0, columns) with columns a multiple of 16 for f32 or 32 for bf16, zero-padded) into `panel`.
  void (*pack)(const float* rows_f32, int64_t stride, int64_t columns, int64_t panel_rows, void* panel);
};

void pack_scalar(const float* src, int64_t stride, int64_t columns, int64_t panel_rows, void* panel) {
  auto* dst = static_cast<float*>(panel);
  for (int64_t c = 0; c < columns; c++)
    for (int64_t r = 0; r < panel_rows; r++) dst[c * panel_rows + r] = src[r * stride + c];
}

#ifdef AFM_X86

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see dot.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int Tokens, bool Bf16>
AFM_AVX512_BF16 void micro_avx512(const void* x_in, int64_t x_stride, const void* panel_in, int64_t depth,
                                  float* out, int64_t out_stride, int64_t rows, bool accumulate) {
  __m512 acc[Tokens][2];
#pragma GCC unroll 12
  for (int t = 0; t < Tokens; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  const auto* panel = static_cast<const float*>(panel_in);  // 32 entries (f32 or bf16 pairs) per step
  const auto* x = static_cast<const float*>(x_in);          // 32-bit elements, either way
  for (int64_t i = 0; i < depth; i++) {
    const __m512 w0 = _mm512_loadu_ps(panel + 32 * i), w1 = _mm512_loadu_ps(panel + 32 * i + 16);
#pragma GCC unroll 12
    for (int t = 0; t < Tokens; t++) {
      const __m512 b = _mm512_set1_ps(x[t * x_stride + i]);
      if constexpr (Bf16) {
        acc[t][0] = _mm512_dpbf16_ps(acc[t][0], __m512bh(w0), __m512bh(b));
        acc[t][1] = _mm512_dpbf16_ps(acc[t][1], __m512bh(w1), __m512bh(b));
      } else {
        acc[t][0] = _mm512_fmadd_ps(w0, b, acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(w1, b, acc[t][1]);
      }
    }
  }
  const __mmask16 m0 = rows >= 16 ? 0xFFFF : __mmask16((1u << rows) - 1);
  const __mmask16 m1 = rows >= 32 ? 0xFFFF : rows <= 16 ? 0 : __mmask16((1u << (rows - 16)) - 1);
#pragma GCC unroll 12
  for (int t = 0; t < Tokens; t++) {
    float* o = out + t * out_stride;
    if (accumulate) {
      acc[t][0] = _mm512_add_ps(acc[t][0], _mm512_maskz_loadu_ps(m0, o));
      acc[t][1] = _mm512_add_ps(acc[t][1], _mm512_maskz_loadu_ps(m1, o + 16));
    }
    _mm512_mask_storeu_ps(o, m0, acc[t][0]);
    _mm512_mask_storeu_ps(o + 16, m1, acc[t][1]);
  }
}

// Transposes a 16 x 16 tile of 32-bit words: row r of `src` (stride src_stride) becomes column r
// of `dst` (stride dst_stride).
AFM_AVX512 void transpose16(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of words
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks of words
    for (int j = 0; j < 2; j++) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  // Lanes of 128 bits now hold 4 x 4 transposed blocks; reorder the blocks across vectors.
  for (int i = 0; i < 4; i++) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);        // 128-bit lanes 0, 2 of each
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);    // lanes 1, 3
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; i++) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
  // r[j] now holds, for j = 4a + b, rows in the order the unpacks left them: word order fix-up.
  static constexpr int kOrder[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * dst_stride, r[kOrder[i]]);
}

AFM_AVX512 void pack_avx512(const float* src, int64_t stride, int64_t columns, int64_t panel_rows, void* panel) {
  auto* dst = static_cast<float*>(panel);
  for (int64_t c = 0; c < columns; c += kTransposeTile)
    for (int64_t r = 0; r < panel_rows; r += kTransposeTile)
      transpose16(src + r * stride + c, stride, dst + c * panel_rows + r, panel_rows);
}

// The bf16 family packs pairs: rows are first rounded to bf16 (exact for the weight formats that
// reach it), then each pair of columns is one 32-bit word of the transposed tile.
AFM_AVX512_BF16 void pack_avx512_bf16(const float* src, int64_t stride, int64_t columns, int64_t panel_rows,
                                      void* panel) {
  alignas(64) float pairs[kTransposeTile * kTransposeTile];  // 16 rows x 16 pairs, as words
  auto* dst = static_cast<float*>(panel);
  for (int64_t c = 0; c < columns; c += 2 * kTransposeTile) {
    for (int64_t r = 0; r < panel_rows; r += kTransposeTile) {
      for (int64_t i = 0; i < kTransposeTile; i++) {
        const float* row = src + (r + i) * stride + c;
        const __m512bh bf = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row));
        _mm512_store_ps(pairs + i * kTransposeTile, __m512(bf));
      }
      transpose16(pairs, kTransposeTile, dst + c / 2 * panel_rows + r, panel_rows);
    }
  }
}

template <int Tokens>
AFM_AVX2 void micro_avx2(const void* x_in, int64_t x_stride, const void* panel_in, int64_t depth, float* out,
                         int64_t out_stride, int64_t rows, bool accumulate) {
  __m256 acc[Tokens][2];
#pragma GCC unroll 6
  for (int t = 0; t < Tokens; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  const auto* panel = static_cast<const float*>(panel_in);
  const auto* x = static_cast<const float*>(x_in);
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
template <int T> struct Avx512F32 { static constexpr MicroFn fn = micro_avx512<T, false>; };
template <int T> struct Avx512Bf16 { static constexpr MicroFn fn = micro_avx512<T, true>; };
template <int T> struct Avx2F32 { static constexpr MicroFn fn = micro_avx2<T>; };

constexpr auto kAvx512F32 = micro_table<Avx512F32>(std::make_index_sequence<12>());
constexpr auto kAvx512Bf16 = micro_table<Avx512Bf16>(std::make_index_sequence<12>());
constexpr auto kAvx2F32 = micro_table<Avx2F32>(std::make_index_sequence<6>());

#endif  // AFM_X86

Family family(Isa isa, const Weight& w) {
#ifdef AFM_X86
  const bool bf16 = isa == Isa::Avx512Bf16 && w.inputs != MatmulInputs::F32 && w.format != WeightFormat::F32 &&
                    w.format != WeightFormat::F16;
  if (bf16) return {32, 12, true, kAvx512Bf16.data(), pack_avx512_bf16};
  if (isa == Isa::Avx512 || isa == Isa::Avx512Bf16) return {32, 12, false, kAvx512F32.data(), pack_avx512};
  if (isa == Isa::Avx2) return {16, 6, false, kAvx2F32.data(), pack_scalar};
#endif
  throw Error(std::string("gemm: no kernels for ") + isa_name(isa));
}

// x as the micro-kernels read it: f32 as it is, or bf16 pairs (one 32-bit word per 2 columns,
// zero-padded to an even count).
struct PackedX {
  std::vector<uint16_t> bf16;
  const void* data;
  int64_t stride;  // 32-bit elements per token
};

PackedX pack_x(const float* x, int64_t T, int64_t K, bool bf16) {
  if (!bf16) return {{}, x, K};
  PackedX p;
  const int64_t padded = round_up(K, 2);
  p.bf16.assign(T * padded, 0);
  for (int64_t t = 0; t < T; t++)
    for (int64_t k = 0; k < K; k++) {
      uint32_t bits;
      std::memcpy(&bits, x + t * K + k, 4);
      p.bf16[t * padded + k] = uint16_t(bits >> 16);  // x is already a bf16 value: no rounding
    }
  p.data = p.bf16.data();
  p.stride = padded / 2;
  return p;
}

// One thread's work on weight rows [n0, n0 + rows): decode, pack, multiply, slice by slice.
void gemm_block(const Weight& w, const Family& f, DecodeFn decode, const PackedX& x, int64_t T, float* out,
                int64_t n0, int64_t rows) {
  const int64_t K = w.cols, N = w.rows;
  const int64_t panels = (rows + f.panel_rows - 1) / f.panel_rows;
  const int64_t padded_rows = panels * f.panel_rows;
  const int64_t slice_cols = f.bf16 ? 2 * kTransposeTile : kTransposeTile;  // packing granularity
  thread_local std::vector<float> decoded, packed;  // [padded_rows][kDepth], [panels][depth][panel_rows]
  decoded.assign(padded_rows * kDepth, 0.0f);
  packed.resize(padded_rows * kDepth);
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t cols = std::min(kDepth, K - k0), padded_cols = round_up(cols, slice_cols);
    for (int64_t r = 0; r < rows; r++) {
      float* row = decoded.data() + r * kDepth;
      decode(w.data + (n0 + r) * w.row_bytes, K, k0, cols, row);
      std::fill(row + cols, row + padded_cols, 0.0f);
    }
    const int64_t panel_words = (f.bf16 ? padded_cols / 2 : padded_cols) * f.panel_rows;
    for (int64_t p = 0; p < panels; p++)
      f.pack(decoded.data() + p * f.panel_rows * kDepth, kDepth, padded_cols, f.panel_rows,
             packed.data() + p * panel_words);
    const int64_t depth = f.bf16 ? (cols + 1) / 2 : cols;
    const int64_t x_offset = f.bf16 ? k0 / 2 : k0;
    for (int64_t t0 = 0; t0 < T; t0 += f.max_tokens) {
      const int tokens = int(std::min<int64_t>(f.max_tokens, T - t0));
      const auto* x_tile = static_cast<const float*>(x.data) + t0 * x.stride + x_offset;
      for (int64_t p = 0; p < panels; p++) {
        const int64_t r0 = p * f.panel_rows;
        f.micro[tokens - 1](x_tile, x.stride, packed.data() + p * panel_words, depth, out + t0 * N + n0 + r0, N,
                            rows - r0, k0 > 0);
      }
    }
  }
}

}  // namespace

bool gemm_supported(Isa isa) { return isa != Isa::Scalar && isa_supported(isa); }

void gemm(const Weight& w, const float* x, int64_t T, float* out, ThreadPool& pool, Isa isa) {
  if (!gemm_supported(isa)) throw Error(std::string("gemm: no kernels for ") + isa_name(isa) + " on this CPU");
  const Family f = family(isa, w);
  const DecodeFn decode = decode_kernel(w.format, isa);
  const PackedX packed_x = pack_x(x, T, w.cols, f.bf16);
  // Blocks of whole panels, at least one per thread, so both cores have work on narrow matrices.
  const int64_t N = w.rows;
  const int64_t blocks = round_up((N + kBlockRows - 1) / kBlockRows, pool.size());
  const int64_t block_rows = round_up((N + blocks - 1) / blocks, f.panel_rows);
  pool.parallel_for((N + block_rows - 1) / block_rows, 1, T * N * w.cols, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const int64_t n0 = b * block_rows;
      gemm_block(w, f, decode, packed_x, T, out, n0, std::min(block_rows, N - n0));
    }
  });
}

}  // namespace afm::cpu
