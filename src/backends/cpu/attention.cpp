// Causal GQA attention over the paged KV cache, FlashAttention-style: each work item takes some
// query rows of one kv head and walks the cached keys a chunk of 16 positions at a time, keeping
// per row a running max m, a running sum l and an unnormalised output o (the online softmax), so
// no score buffer as long as the context is ever built and each key and value chunk is read once
// for all the rows of the item (the `group` query heads that share the kv head, and in prefill a
// tile of query tokens).
//
// Per chunk three kernels run, in scalar, AVX2 and AVX-512 versions for each cache type:
//   scores      s[r][j] = q_r . k_j for the chunk's 16 slots. Keys are stored transposed
//               ([head_dim][slot], kv_cache.h), so each head_dim element is one vector of 16 slots
//               times a broadcast query element: no horizontal sums.
//   softmax     masks the slots past each row's position, updates m and l, turns s into
//               p = exp(s - m) and gives the factor alpha = exp(m_old - m) for the old o.
//   accumulate  o_r = alpha_r o_r + sum_j p[r][j] v_j over value rows [slot][head_dim].
// Keys and values are widened from the cache type to f32 as they are loaded; all sums are f32.
#include "backends/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "backends/cpu/row_count.h"
#include "backends/cpu/simd.h"
#include "error.h"
#include "numeric.h"

namespace afm::cpu {

namespace {

constexpr int kChunk = 16;                // key positions per softmax step
constexpr int64_t kQueryTile = 16;        // prefill: query tokens per work item
constexpr int64_t kMinSplit = 256;        // decode: fewest key positions worth a split of their own
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using ScoresFn = void (*)(const float* q, int rows, const uint8_t* keys, int64_t stride, int64_t head_dim, float* s,
                          const uint8_t* next_keys);
using SoftmaxFn = void (*)(float* s, int rows, const int* limit, float* m, float* l, float* alpha);
using AccumulateFn = void (*)(const float* p, int rows, const uint8_t* values, int n, int64_t head_dim,
                              const float* alpha, float* o, const uint8_t* next_values);

// The kernels for one ISA and cache type. For all three, rows r < `rows` are query rows of
// head_dim (q and o at r * head_dim) and s, p are [rows][kChunk]. next_keys / next_values are
// the next chunk's (null for the last), which the kernels fetch into cache as they go.
struct Kernels {
  // Scores of the kChunk slots starting at `keys` (element (d, j) at d * stride + j). Slots past
  // the chunk's end give meaningless scores, which softmax masks.
  ScoresFn scores;
  // limit[r]: how many leading slots row r sees (<= 0: none, so p = 0 and alpha = 1).
  SoftmaxFn softmax;
  // n: the chunk's slots (value rows at `values`, head_dim elements apart).
  AccumulateFn accumulate;
};

// The next chunk's bytes at `next` (none when null), fetched a few cache lines per step of a
// kernel's loop of `steps` steps, so the fetches overlap the arithmetic instead of queueing up in
// one burst.
class ChunkPrefetch {
 public:
  ChunkPrefetch(const uint8_t* next, int64_t bytes, int64_t steps)
      : next_(next), lines_((bytes + 63) / 64), per_step_(steps > 0 ? (lines_ + steps - 1) / steps : lines_) {}
  void step() {
    if (!next_) return;
    for (int64_t i = 0; i < per_step_ && line_ < lines_; i++, line_++) __builtin_prefetch(next_ + 64 * line_);
  }

 private:
  const uint8_t* next_;
  int64_t lines_, per_step_, line_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Scalar: the portable version, which AVX2 also falls back to when head_dim is not a multiple of 8.

template <KVCacheType T>
float element(const uint8_t* p, int64_t i) {
  if constexpr (T == KVCacheType::F32) {
    float f;
    std::memcpy(&f, p + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    return T == KVCacheType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
  }
}

template <KVCacheType T>
void scores_scalar(const float* q, int rows, const uint8_t* keys, int64_t stride, int64_t head_dim, float* s,
                   const uint8_t* next_keys) {
  ChunkPrefetch prefetch(next_keys, head_dim * stride * kv_element_bytes(T), kChunk);
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < kChunk; j++) {
      prefetch.step();
      float acc = 0;
      for (int64_t d = 0; d < head_dim; d++) acc += q[r * head_dim + d] * element<T>(keys, d * stride + j);
      s[r * kChunk + j] = acc;
    }
}

void softmax_scalar(float* s, int rows, const int* limit, float* m, float* l, float* alpha) {
  for (int r = 0; r < rows; r++) {
    float* row = s + r * kChunk;
    const int n = std::min(limit[r], kChunk);
    if (n <= 0) {
      std::fill_n(row, kChunk, 0.0f);
      alpha[r] = 1;
      continue;
    }
    const float m_new = std::max(m[r], *std::max_element(row, row + n));
    alpha[r] = std::exp(m[r] - m_new);  // 0 on the first chunk, where m is -inf
    float sum = 0;
    for (int j = 0; j < n; j++) sum += row[j] = std::exp(row[j] - m_new);
    std::fill(row + n, row + kChunk, 0.0f);
    l[r] = l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

template <KVCacheType T>
void accumulate_scalar(const float* p, int rows, const uint8_t* values, int n, int64_t head_dim, const float* alpha,
                       float* o, const uint8_t* next_values) {
  ChunkPrefetch prefetch(next_values, kChunk * head_dim * kv_element_bytes(T), rows);
  for (int r = 0; r < rows; r++) {
    prefetch.step();
    float* out = o + r * head_dim;
    for (int64_t d = 0; d < head_dim; d++) out[d] *= alpha[r];
    for (int j = 0; j < n; j++) {
      const float weight = p[r * kChunk + j];
      for (int64_t d = 0; d < head_dim; d++) out[d] += weight * element<T>(values, j * head_dim + d);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// e^x for x <= 0 in SIMD, as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-5
// polynomial, 2^n through the exponent bits; relative error under 2e-7. Below ln(FLT_MIN) the
// result is 0 (so -inf, a masked score, gives exactly 0).
constexpr float kExpMin = -87.33654f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#ifdef AFM_X86

// ----- AVX2: a chunk of 16 slots is two vectors of 8 -----

template <KVCacheType T>
AFM_AVX2 inline __m256 load8(const uint8_t* p) {  // elements 0..7 at p, widened to f32
  if constexpr (T == KVCacheType::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (T == KVCacheType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AFM_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMin), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; i++) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), keep);
}

AFM_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AFM_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// NR rows at once: 2 * NR accumulators, one pass over the chunk's keys for all of them. (The
// unroll pragmas on the row loops let GCC keep the accumulator arrays in registers; without them
// it stores every accumulator to the stack on every step.)
template <KVCacheType T, int NR>
AFM_AVX2 void score_rows_avx2(const float* q, const uint8_t* keys, int64_t stride, int64_t head_dim, float* s,
                              const uint8_t* next) {
  constexpr int64_t e = T == KVCacheType::F32 ? 4 : 2;
  ChunkPrefetch prefetch(next, head_dim * stride * e, head_dim);
  __m256 lo[NR], hi[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; r++) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < head_dim; d++) {
    const __m256 k_lo = load8<T>(keys + d * stride * e), k_hi = load8<T>(keys + (d * stride + 8) * e);
    prefetch.step();
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) {
      const __m256 qd = _mm256_broadcast_ss(q + r * head_dim + d);
      lo[r] = _mm256_fmadd_ps(qd, k_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(qd, k_hi, hi[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; r++) {
    _mm256_storeu_ps(s + r * kChunk, lo[r]);
    _mm256_storeu_ps(s + r * kChunk + 8, hi[r]);
  }
}

template <KVCacheType T>
AFM_AVX2 void scores_avx2(const float* q, int rows, const uint8_t* keys, int64_t stride, int64_t head_dim, float* s,
                          const uint8_t* next_keys) {
  constexpr int kRows = 6;  // 12 accumulators + 2 key vectors + 1 broadcast fit the 16 registers
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const float* qr = q + r0 * head_dim;
    float* sr = s + r0 * kChunk;
    with_count<kRows>(std::min(kRows, rows - r0),
                      [&]<int R>() { score_rows_avx2<T, R>(qr, keys, stride, head_dim, sr, r0 == 0 ? next_keys : nullptr); });
  }
}

AFM_AVX2 void softmax_avx2(float* s, int rows, const int* limit, float* m, float* l, float* alpha) {
  const __m256i lane_lo = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), lane_hi = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
  for (int r = 0; r < rows; r++) {
    float* row = s + r * kChunk;
    if (limit[r] <= 0) {
      _mm256_storeu_ps(row, _mm256_setzero_ps());
      _mm256_storeu_ps(row + 8, _mm256_setzero_ps());
      alpha[r] = 1;
      continue;
    }
    // Masked slots become -inf, whose exp is 0: they drop out of the max, the sum and p.
    const __m256i n = _mm256_set1_epi32(limit[r]);
    const __m256 neg_inf = _mm256_set1_ps(kNegInf);
    const __m256 lo = _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(row), _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, lane_lo)));
    const __m256 hi = _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(row + 8), _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, lane_hi)));
    const float m_new = std::max(m[r], hmax_avx2(_mm256_max_ps(lo, hi)));
    alpha[r] = std::exp(m[r] - m_new);  // 0 on the first chunk, where m is -inf
    const __m256 p_lo = exp_avx2(_mm256_sub_ps(lo, _mm256_set1_ps(m_new)));
    const __m256 p_hi = exp_avx2(_mm256_sub_ps(hi, _mm256_set1_ps(m_new)));
    _mm256_storeu_ps(row, p_lo);
    _mm256_storeu_ps(row + 8, p_hi);
    l[r] = l[r] * alpha[r] + hsum_avx2(_mm256_add_ps(p_lo, p_hi));
    m[r] = m_new;
  }
}

// NR rows of 8 output columns at c: each value vector is loaded once for all NR rows. Even and
// odd value rows go to separate accumulators, so decode's few rows do not wait on FMA latency.
template <KVCacheType T, int NR>
AFM_AVX2 void accumulate_rows_avx2(const float* p, const uint8_t* values, int n, int64_t head_dim, const float* alpha,
                                   float* o, const uint8_t* next) {
  constexpr int64_t e = T == KVCacheType::F32 ? 4 : 2;
  ChunkPrefetch prefetch(next, kChunk * head_dim * e, head_dim / 8 * (kChunk / 2));
  for (int64_t c = 0; c < head_dim; c += 8) {
    __m256 even[NR], odd[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) {
      even[r] = _mm256_mul_ps(_mm256_set1_ps(alpha[r]), _mm256_loadu_ps(o + r * head_dim + c));
      odd[r] = _mm256_setzero_ps();
    }
    int j = 0;
    for (; j + 2 <= n; j += 2) {
      const __m256 v0 = load8<T>(values + (j * head_dim + c) * e), v1 = load8<T>(values + ((j + 1) * head_dim + c) * e);
      prefetch.step();
#pragma GCC unroll 8
      for (int r = 0; r < NR; r++) {
        even[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * kChunk + j), v0, even[r]);
        odd[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * kChunk + j + 1), v1, odd[r]);
      }
    }
    if (j < n) {
      const __m256 v0 = load8<T>(values + (j * head_dim + c) * e);
#pragma GCC unroll 8
      for (int r = 0; r < NR; r++) even[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * kChunk + j), v0, even[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) _mm256_storeu_ps(o + r * head_dim + c, _mm256_add_ps(even[r], odd[r]));
  }
}

// Needs head_dim % 8 == 0 (kernels_for falls back to scalar otherwise).
template <KVCacheType T>
AFM_AVX2 void accumulate_avx2(const float* p, int rows, const uint8_t* values, int n, int64_t head_dim,
                              const float* alpha, float* o, const uint8_t* next_values) {
  constexpr int kRows = 6;  // 12 accumulators + 2 value vectors fit the 16 registers
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const float* pr = p + r0 * kChunk;
    const float* ar = alpha + r0;
    float* orow = o + r0 * head_dim;
    with_count<kRows>(std::min(kRows, rows - r0),
                      [&]<int R>() { accumulate_rows_avx2<T, R>(pr, values, n, head_dim, ar, orow, r0 == 0 ? next_values : nullptr); });
  }
}

// ----- AVX-512: a chunk of 16 slots is one vector; a head_dim tail is a masked vector -----

// GCC 12's AVX-512 headers fill "undefined" pass-through operands with a self-initialised
// variable, which -Wuninitialized reports at every inlined use (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <KVCacheType T>
AFM_AVX512 inline __m512 load16(const uint8_t* p, __mmask16 mask) {  // masked-off lanes read as 0
  if constexpr (T == KVCacheType::F32) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  if constexpr (T == KVCacheType::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AFM_AVX512 inline __m512 exp_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; i++) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, y, _mm512_castsi512_ps(pow2n));
}

// Two accumulators per row, for even and odd d: with only `group` rows (decode), one chain per
// row would wait on FMA latency.
template <KVCacheType T, int NR>
AFM_AVX512 void score_rows_avx512(const float* q, const uint8_t* keys, int64_t stride, int64_t head_dim, float* s,
                                  const uint8_t* next) {
  constexpr int64_t e = T == KVCacheType::F32 ? 4 : 2;
  ChunkPrefetch prefetch(next, head_dim * stride * e, head_dim / 2);
  __m512 even[NR], odd[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; r++) even[r] = odd[r] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 2 <= head_dim; d += 2) {
    const __m512 k0 = load16<T>(keys + d * stride * e, 0xFFFF), k1 = load16<T>(keys + (d + 1) * stride * e, 0xFFFF);
    prefetch.step();
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) {
      even[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * head_dim + d]), k0, even[r]);
      odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * head_dim + d + 1]), k1, odd[r]);
    }
  }
  if (d < head_dim) {
    const __m512 k0 = load16<T>(keys + d * stride * e, 0xFFFF);
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) even[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * head_dim + d]), k0, even[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < NR; r++) _mm512_storeu_ps(s + r * kChunk, _mm512_add_ps(even[r], odd[r]));
}

template <KVCacheType T>
AFM_AVX512 void scores_avx512(const float* q, int rows, const uint8_t* keys, int64_t stride, int64_t head_dim,
                              float* s, const uint8_t* next_keys) {
  constexpr int kRows = 8;
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const float* qr = q + r0 * head_dim;
    float* sr = s + r0 * kChunk;
    with_count<kRows>(std::min(kRows, rows - r0),
                      [&]<int R>() { score_rows_avx512<T, R>(qr, keys, stride, head_dim, sr, r0 == 0 ? next_keys : nullptr); });
  }
}

AFM_AVX512 void softmax_avx512(float* s, int rows, const int* limit, float* m, float* l, float* alpha) {
  for (int r = 0; r < rows; r++) {
    float* row = s + r * kChunk;
    if (limit[r] <= 0) {
      _mm512_storeu_ps(row, _mm512_setzero_ps());
      alpha[r] = 1;
      continue;
    }
    // Masked slots load as -inf, whose exp is 0: they drop out of the max, the sum and p.
    const __mmask16 valid = limit[r] >= kChunk ? __mmask16(0xFFFF) : __mmask16((1u << limit[r]) - 1);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), valid, row);
    const float m_new = std::max(m[r], _mm512_reduce_max_ps(v));
    alpha[r] = std::exp(m[r] - m_new);  // 0 on the first chunk, where m is -inf
    const __m512 p = exp_avx512(_mm512_sub_ps(v, _mm512_set1_ps(m_new)));
    _mm512_storeu_ps(row, p);
    l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(p);
    m[r] = m_new;
  }
}

// Even and odd value rows in separate accumulators, as in score_rows_avx512.
template <KVCacheType T, int NR>
AFM_AVX512 void accumulate_rows_avx512(const float* p, const uint8_t* values, int n, int64_t head_dim,
                                       const float* alpha, float* o, const uint8_t* next) {
  constexpr int64_t e = T == KVCacheType::F32 ? 4 : 2;
  ChunkPrefetch prefetch(next, kChunk * head_dim * e, (head_dim + 15) / 16 * (kChunk / 2));
  for (int64_t c = 0; c < head_dim; c += 16) {
    const __mmask16 cols = head_dim - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (head_dim - c)) - 1);
    __m512 even[NR], odd[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) {
      even[r] = _mm512_mul_ps(_mm512_set1_ps(alpha[r]), _mm512_maskz_loadu_ps(cols, o + r * head_dim + c));
      odd[r] = _mm512_setzero_ps();
    }
    int j = 0;
    for (; j + 2 <= n; j += 2) {
      const __m512 v0 = load16<T>(values + (j * head_dim + c) * e, cols);
      const __m512 v1 = load16<T>(values + ((j + 1) * head_dim + c) * e, cols);
      prefetch.step();
#pragma GCC unroll 8
      for (int r = 0; r < NR; r++) {
        even[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * kChunk + j]), v0, even[r]);
        odd[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * kChunk + j + 1]), v1, odd[r]);
      }
    }
    if (j < n) {
      const __m512 v0 = load16<T>(values + (j * head_dim + c) * e, cols);
#pragma GCC unroll 8
      for (int r = 0; r < NR; r++) even[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * kChunk + j]), v0, even[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < NR; r++) _mm512_mask_storeu_ps(o + r * head_dim + c, cols, _mm512_add_ps(even[r], odd[r]));
  }
}

template <KVCacheType T>
AFM_AVX512 void accumulate_avx512(const float* p, int rows, const uint8_t* values, int n, int64_t head_dim,
                                  const float* alpha, float* o, const uint8_t* next_values) {
  constexpr int kRows = 8;
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const float* pr = p + r0 * kChunk;
    const float* ar = alpha + r0;
    float* orow = o + r0 * head_dim;
    with_count<kRows>(std::min(kRows, rows - r0),
                      [&]<int R>() { accumulate_rows_avx512<T, R>(pr, values, n, head_dim, ar, orow, r0 == 0 ? next_values : nullptr); });
  }
}

#pragma GCC diagnostic pop

#endif  // AFM_X86

template <KVCacheType T>
constexpr Kernels kScalar{scores_scalar<T>, softmax_scalar, accumulate_scalar<T>};
#ifdef AFM_X86
template <KVCacheType T>
constexpr Kernels kAvx2{scores_avx2<T>, softmax_avx2, accumulate_avx2<T>};
template <KVCacheType T>
constexpr Kernels kAvx512{scores_avx512<T>, softmax_avx512, accumulate_avx512<T>};
#endif

const Kernels& kernels_for(Isa isa, KVCacheType type, int64_t head_dim) {
  if (!isa_supported(isa)) throw Error(std::string("attention: this CPU does not support ") + isa_name(isa));
  auto pick = [type](const Kernels& f32, const Kernels& f16, const Kernels& bf16) -> const Kernels& {
    return type == KVCacheType::F32 ? f32 : type == KVCacheType::F16 ? f16 : bf16;
  };
  using enum KVCacheType;
  const Kernels& scalar = pick(kScalar<F32>, kScalar<F16>, kScalar<BF16>);
#ifdef AFM_X86
  if (isa == Isa::Scalar) return scalar;
  if (isa == Isa::Avx2) return head_dim % 8 == 0 ? pick(kAvx2<F32>, kAvx2<F16>, kAvx2<BF16>) : scalar;
  return pick(kAvx512<F32>, kAvx512<F16>, kAvx512<BF16>);  // Avx512 and the ISAs that extend it
#else
  return scalar;
#endif
}

// ---------------------------------------------------------------------------------------------
// The driver: work items, each a run of the online softmax over a range of key positions.

// The online-softmax state of `rows` query rows (row r at r * head_dim in o).
struct State {
  float* m;
  float* l;
  float* o;
};

// Per-thread buffers, grown as needed and kept between calls (a decode step makes one call per
// layer, so allocating each time would be a malloc per layer per token).
struct Scratch {
  std::vector<float> q, s, alpha, m, l, o;
  std::vector<int> limit;
  std::vector<int32_t> position;
};

// Runs rows `rows` (scaled queries q, row r at position[r]) of kv head `kv_head` over the cached
// key positions [begin, end), from a fresh state into `state`. Chunks never cross a block.
void attend(const Kernels& kernels, const KVCache& cache, int64_t layer, int64_t kv_head, const float* q, int rows,
            const int32_t* position, int64_t begin, int64_t end, State state, Scratch& scratch) {
  const KVShape& shape = cache.shape();
  const int64_t head_dim = shape.head_dim, block_size = shape.block_size, e = shape.element_bytes();
  std::fill_n(state.m, rows, kNegInf);
  std::fill_n(state.l, rows, 0.0f);
  std::fill_n(state.o, rows * head_dim, 0.0f);
  scratch.s.resize(size_t(rows) * kChunk);
  scratch.alpha.resize(rows);
  scratch.limit.resize(rows);
  for (int64_t p = begin; p < end;) {
    const int64_t block = p / block_size, slot = p % block_size;
    const int n = int(std::min({int64_t(kChunk), block_size - slot, end - p}));
    // The next chunk's keys and values are fetched while this one is computed, a cache line per
    // step of the kernels' loops: chunks lie in separate blocks, where the hardware prefetchers
    // stop, so without this every chunk would start with a wait on memory.
    const uint8_t *next_keys = nullptr, *next_values = nullptr;
    if (p + n < end) {
      const int64_t next = (p + n) / block_size, next_slot = (p + n) % block_size;
      next_keys = cache.key_block(layer, kv_head, next) + next_slot * e;
      next_values = cache.value_block(layer, kv_head, next) + next_slot * head_dim * e;
    }
    kernels.scores(q, rows, cache.key_block(layer, kv_head, block) + slot * e, block_size, head_dim, scratch.s.data(),
                   next_keys);
    for (int r = 0; r < rows; r++) scratch.limit[r] = int(std::clamp<int64_t>(position[r] - p + 1, 0, n));
    kernels.softmax(scratch.s.data(), rows, scratch.limit.data(), state.m, state.l, scratch.alpha.data());
    kernels.accumulate(scratch.s.data(), rows, cache.value_block(layer, kv_head, block) + slot * head_dim * e, n,
                       head_dim, scratch.alpha.data(), state.o, next_values);
    p += n;
  }
}

}  // namespace

void cache_update(KVCache& cache, int64_t layer, const Tensor& k, const Tensor& v,
                  std::span<const int32_t> positions) {
  const KVShape& s = cache.shape();
  for (int64_t t = 0; t < k.rows; t++)
    for (int64_t h = 0; h < s.num_kv_heads; h++)
      cache.write(layer, h, positions[t], k.row(t) + h * s.head_dim, v.row(t) + h * s.head_dim);
}

void attention(const Tensor& q, const KVCache& cache, int64_t layer, std::span<const int32_t> positions, Tensor& out,
               ThreadPool& pool, Isa isa) {
  const KVShape& shape = cache.shape();
  const int64_t head_dim = shape.head_dim, num_kv_heads = shape.num_kv_heads;
  const int64_t group = q.cols / head_dim / num_kv_heads, T = q.rows;
  const Kernels& kernels = kernels_for(isa, shape.type, head_dim);
  const float scale = 1.0f / std::sqrt(float(head_dim));
  const int64_t visible = *std::max_element(positions.begin(), positions.end()) + 1;

  // Work items: (tile of query tokens, kv head, split of the key range). A tile's rows are its
  // tokens times the group's heads, so a key chunk loaded once serves all of them. Decode has one
  // tile; with few kv heads its items would leave threads idle, so the key range is split until
  // there are about 4 items per thread (dynamic claiming then evens out the uneven ones), each
  // split at least kMinSplit positions, and the partial states are merged at the end.
  const int64_t tile = std::min(T, kQueryTile), tiles = (T + tile - 1) / tile;
  int64_t splits = 1;
  if (tiles * num_kv_heads < 4 * pool.size())
    splits = std::clamp<int64_t>((4 * pool.size() + tiles * num_kv_heads - 1) / (tiles * num_kv_heads), 1,
                                 (visible + kMinSplit - 1) / kMinSplit);
  const int64_t items = tiles * num_kv_heads * splits, rows_per_tile = tile * group;
  // Partial states of split items, [item][m, l, o of the tile's rows]; unsplit items use scratch.
  const int64_t state_floats = rows_per_tile * (head_dim + 2);
  std::vector<float> partial(splits > 1 ? size_t(items * state_floats) : 0);

  pool.parallel_for(items, 1, T * q.cols * visible, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    for (int64_t item = begin; item < end; item++) {
      // The last tiles see the most keys: hand them out first, so the short ones fill the gaps.
      const int64_t tile_index = tiles - 1 - item / (num_kv_heads * splits);
      const int64_t kv_head = item / splits % num_kv_heads, split = item % splits;
      const int64_t t0 = tile_index * tile, t1 = std::min(T, t0 + tile);
      const int rows = int((t1 - t0) * group);

      // The tile's queries, scaled once here instead of every score.
      scratch.q.resize(size_t(rows) * head_dim);
      scratch.position.resize(rows);
      for (int64_t t = t0; t < t1; t++)
        for (int64_t g = 0; g < group; g++) {
          const int64_t r = (t - t0) * group + g;
          const float* src = q.row(t) + (kv_head * group + g) * head_dim;
          for (int64_t d = 0; d < head_dim; d++) scratch.q[r * head_dim + d] = src[d] * scale;
          scratch.position[r] = positions[t];
        }

      // This split's key range: the tile's visible positions cut into `splits` pieces on chunk
      // boundaries.
      const int64_t tile_visible = *std::max_element(&positions[t0], &positions[t0] + (t1 - t0)) + 1;
      auto split_at = [&](int64_t s) {
        return std::min(tile_visible, (tile_visible * s / splits + kChunk - 1) / kChunk * kChunk);
      };
      State state;
      if (splits > 1) {
        float* p = &partial[item * state_floats];
        state = {p, p + rows_per_tile, p + 2 * rows_per_tile};
      } else {
        scratch.m.resize(rows);
        scratch.l.resize(rows);
        scratch.o.resize(size_t(rows) * head_dim);
        state = {scratch.m.data(), scratch.l.data(), scratch.o.data()};
      }
      attend(kernels, cache, layer, kv_head, scratch.q.data(), rows, scratch.position.data(), split_at(split),
             split_at(split + 1), state, scratch);

      if (splits == 1)
        for (int r = 0; r < rows; r++) {
          const int64_t t = t0 + r / group, g = r % group;
          float* o = out.row(t) + (kv_head * group + g) * head_dim;
          const float inv = 1.0f / state.l[r];
          for (int64_t d = 0; d < head_dim; d++) o[d] = state.o[r * head_dim + d] * inv;
        }
    }
  });
  if (splits == 1) return;

  // Merge the splits of each (tile, kv head) row: rescale each partial sum to the overall max.
  for (int64_t item0 = 0; item0 < items; item0 += splits) {
    const int64_t tile_index = tiles - 1 - item0 / (num_kv_heads * splits), kv_head = item0 / splits % num_kv_heads;
    const int64_t t0 = tile_index * tile, rows = (std::min(T, t0 + tile) - t0) * group;
    for (int64_t r = 0; r < rows; r++) {
      auto part = [&](int64_t s) { return &partial[(item0 + s) * state_floats]; };
      float m = kNegInf;
      for (int64_t s = 0; s < splits; s++) m = std::max(m, part(s)[r]);
      float* o = out.row(t0 + r / group) + (kv_head * group + r % group) * head_dim;
      std::fill_n(o, head_dim, 0.0f);
      float l = 0;
      for (int64_t s = 0; s < splits; s++) {
        const float* p = part(s);
        const float w = std::exp(p[r] - m);  // 0 for a split that row saw nothing of (m = -inf)
        l += w * p[rows_per_tile + r];
        const float* po = p + 2 * rows_per_tile + r * head_dim;
        for (int64_t d = 0; d < head_dim; d++) o[d] += w * po[d];
      }
      for (int64_t d = 0; d < head_dim; d++) o[d] /= l;
    }
  }
}

}  // namespace afm::cpu
