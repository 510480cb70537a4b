// What the GEMMs (gemm.cpp, int8_gemm.cpp) share about their panels of weight rows: how the rows
// are split over threads, the AVX-512 16 x 16 transpose of 32-bit words that packs rows into
// column-major panels (it only moves bits, so it serves f32 values and int8 quads alike), and the
// store of a micro-kernel's results.
#pragma once
#include <algorithm>
#include <cstdint>

#include "backends/cpu/simd.h"
#include "backends/cpu/thread_pool.h"

namespace afm::cpu {

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Splits weight rows [0, n) over the pool into blocks of whole panels, of at most about
// max_block_rows and at least one per thread (so every core has work on narrow matrices), and
// calls block(first_row, rows) for each.
template <class Block>
void for_each_row_block(ThreadPool& pool, int64_t n, int64_t panel_rows, int64_t max_block_rows,
                        int64_t multiply_adds, const Block& block) {
  const int64_t blocks = round_up((n + max_block_rows - 1) / max_block_rows, pool.size());
  const int64_t block_rows = round_up((n + blocks - 1) / blocks, panel_rows);
  pool.parallel_for((n + block_rows - 1) / block_rows, 1, multiply_adds, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) block(b * block_rows, std::min(block_rows, n - b * block_rows));
  });
}

}  // namespace afm::cpu

#ifdef AFM_X86
namespace afm::cpu {

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see dot.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Transposes a 16 x 16 tile of 32-bit words: row r of `src` (stride src_stride) becomes column r
// of `dst` (stride dst_stride).
AFM_AVX512 inline void transpose16(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
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

// Stores one token's sums for a panel's 32 rows (two vectors) at `out`, writing only rows below
// `rows`, and adding what is there when `accumulate` (a later column slice).
AFM_AVX512 inline void store_panel_row(float* out, __m512 lo, __m512 hi, int64_t rows, bool accumulate) {
  const __mmask16 m0 = rows >= 16 ? 0xFFFF : __mmask16((1u << rows) - 1);
  const __mmask16 m1 = rows >= 32 ? 0xFFFF : rows <= 16 ? 0 : __mmask16((1u << (rows - 16)) - 1);
  if (accumulate) {
    lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(m0, out));
    hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(m1, out + 16));
  }
  _mm512_mask_storeu_ps(out, m0, lo);
  _mm512_mask_storeu_ps(out + 16, m1, hi);
}

#pragma GCC diagnostic pop

}  // namespace afm::cpu
#endif
