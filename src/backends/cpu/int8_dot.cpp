// Block-float × int8 dot kernels: portable, AVX2 and AVX-512 VNNI versions of one loop over the
// weight row's blocks, with x quantized by quantize_int8_rows.
#include "backends/cpu/int8_dot.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "backends/cpu/int8_weights.h"
#include "backends/cpu/row_count.h"
#include "backends/cpu/simd.h"
#include "blockfloat.h"
#include "error.h"

namespace afm::cpu {

namespace {

int weight_offset(WeightFormat format) { return format == WeightFormat::BFP8 ? 128 : 8; }

// Pointers to one quantized row.
struct XRow {
  const int8_t* q = nullptr;
  const float* scale = nullptr;
  const int32_t* offset_sums = nullptr;
};

XRow x_row(const Int8Rows& x, int64_t row) {
  return {x.q.data() + row * x.padded, x.scale.data() + row * x.padded / kBlockFloatBlock,
          x.offset_sums.data() + row * x.padded / 4};
}

template <class BF>
void int8_dot_scalar(const uint8_t* w_row, const Int8Rows& x, int64_t first, int n_x, float* out) {
  if (n_x < 1 || n_x > kMaxDotRows) bad_row_count("int8 dot kernel", n_x);
  const int64_t blocks = block_float_blocks(x.k);
  const uint8_t* payloads = w_row + blocks;
  for (int j = 0; j < n_x; j++) {
    const XRow xr = x_row(x, first + j);
    float acc = 0;
    for (int64_t b = 0; b < blocks; b++) {
      int32_t sum = 0;
      for (int i = 0; i < kBlockFloatBlock; i++)
        sum += BF::signed_magnitude(payloads + b * BF::payload_bytes, i) * xr.q[b * kBlockFloatBlock + i];
      acc += float(sum) * (xr.scale[b] * BF::scale[w_row[b]]);
    }
    out[j] = acc;
  }
}

#ifdef AFM_X86

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see dot.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// AVX-512 VNNI. `vpdpbusd` multiplies unsigned by signed bytes, so each weight is read as
// value + offset (load_offset_weights), and the sums start from x's offset_sums, which take the
// offset out.
template <class BF, int NX>
AFM_AVX512_VNNI void int8_dot_vnni_n(const uint8_t* w_row, const Int8Rows& x, int64_t first, float* out) {
  const int64_t blocks = block_float_blocks(x.k), groups = (blocks + 3) / 4;
  const uint8_t* exps = w_row;
  const uint8_t* payloads = w_row + blocks;
  constexpr int64_t kPrefetchAhead = 2048;  // bytes, as in the f32 kernels (dot.cpp)
  XRow xr[NX];
  for (int j = 0; j < NX; j++) xr[j] = x_row(x, first + j);
  __m512 acc[NX];
  for (int j = 0; j < NX; j++) acc[j] = _mm512_setzero_ps();
  const __m512 exponent_bias = _mm512_set1_ps(kExponentBias<BF>);
  // Lane l of a group's sums belongs to its block l / 4.
  const __m512i block_of_lane = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t g0 = 0; g0 < groups; g0 += 4) {
    // 16 blocks share one load of exponents: scale[b] = x's scale * 2^(e_b - 127 - (B - 1)),
    // exactly (scalef), subnormal weight scales included.
    const int64_t blocks_left = blocks - 4 * g0;
    const __mmask16 m = blocks_left >= 16 ? 0xFFFF : __mmask16((1u << blocks_left) - 1);
    const __m512 e = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, exps + 4 * g0))),
                                   exponent_bias);
    __m512 scale[NX];
    for (int j = 0; j < NX; j++) scale[j] = _mm512_scalef_ps(_mm512_maskz_loadu_ps(m, xr[j].scale + 4 * g0), e);
    const int64_t g1 = std::min(groups, g0 + 4);
    for (int64_t g = g0; g < g1; g++) {
      _mm_prefetch(reinterpret_cast<const char*>(payloads + g * BF::payload_bytes * 4) + kPrefetchAhead, _MM_HINT_T0);
      const __m512i w = load_offset_weights<BF>(payloads, g, blocks - 4 * g);
      const __m512i lanes = _mm512_add_epi32(block_of_lane, _mm512_set1_epi32(int(4 * (g - g0))));
#pragma GCC unroll 4
      for (int j = 0; j < NX; j++) {
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_loadu_si512(xr[j].offset_sums + 16 * g), w,
                                                 _mm512_loadu_si512(xr[j].q + kInt8Group * g));
        acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(lanes, scale[j]), acc[j]);
      }
    }
  }
  for (int j = 0; j < NX; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
}

#pragma GCC diagnostic pop

// AVX2. `vpmaddubsw` saturates its 16-bit pair sums, so bfp8 goes through the sign trick
// (|w| times x with w's sign, at most 2 * 127 * 127) instead of an offset; bfp4's offset
// weights (0..15) cannot saturate and use offset_sums like VNNI.
template <class BF, int NX>
AFM_AVX2 void int8_dot_avx2_n(const uint8_t* w_row, const Int8Rows& x, int64_t first, float* out) {
  const int64_t blocks = block_float_blocks(x.k);
  const uint8_t* exps = w_row;
  const uint8_t* payloads = w_row + blocks;
  XRow xr[NX];
  for (int j = 0; j < NX; j++) xr[j] = x_row(x, first + j);
  __m256 acc[NX];
  for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
    // 8 blocks share one exponent load. A scale is built in the exponent field, which holds
    // e - (B - 1) for every weight scale of 2^-126 or more; smaller ones (weights below about
    // 2^-120, which no trained model has) are flushed to zero here.
    const int n = int(std::min<int64_t>(8, blocks - b0));
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
    uint8_t e8[8] = {};
    std::memcpy(e8, exps + b0, size_t(n));
    const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e8)));
    const __m256i field = _mm256_max_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(BF::mag_bits - 1)), _mm256_setzero_si256());
    const __m256 weight_scale = _mm256_castsi256_ps(_mm256_slli_epi32(field, 23));
    __m256 scale[NX];
    for (int j = 0; j < NX; j++) scale[j] = _mm256_mul_ps(weight_scale, _mm256_maskload_ps(xr[j].scale + b0, valid));
    for (int s = 0; s < n; s += 2) {  // two blocks per step; a lone last block pairs with zeros
      const int64_t b = b0 + s;
      const bool pair = s + 1 < n;
      const __m256i lanes = _mm256_setr_epi32(s, s, s, s, s + 1, s + 1, s + 1, s + 1);
      __m256i w;
      if constexpr (BF::mag_bits == 7) {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(payloads + 16 * b));
        const __m128i hi = pair ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(payloads + 16 * (b + 1)))
                                : _mm_setzero_si128();
        w = _mm256_set_m128i(hi, lo);
      } else {
        const __m128i bytes = pair ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(payloads + 8 * b))
                                   : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(payloads + 8 * b));
        const __m128i v = _mm_xor_si128(bytes, _mm_set1_epi8(char(0x88)));  // nibble v -> v + 8
        const __m128i nibble = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
        w = _mm256_set_m128i(_mm_unpackhi_epi64(lo, hi), _mm_unpacklo_epi64(lo, hi));
      }
      const __m256i magnitude = BF::mag_bits == 7 ? _mm256_abs_epi8(w) : w;
#pragma GCC unroll 4
      for (int j = 0; j < NX; j++) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[j].q + kBlockFloatBlock * b));
        __m256i sums;
        if constexpr (BF::mag_bits == 7) {
          sums = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(q, w)), ones);
        } else {
          sums = _mm256_add_epi32(
              _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, q), ones),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[j].offset_sums + 4 * b)));
        }
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_permutevar8x32_ps(scale[j], lanes), acc[j]);
      }
    }
  }
  for (int j = 0; j < NX; j++) out[j] = hsum(acc[j]);
}

#endif  // AFM_X86

// An Int8DotFn over Kernel<NX>::run.
template <template <int> class Kernel>
void by_row_count(const uint8_t* w_row, const Int8Rows& x, int64_t first, int n_x, float* out) {
  run_for_row_count<Kernel>("int8 dot kernel", n_x, w_row, x, first, out);
}

template <class BF>
struct Kernels {
#ifdef AFM_X86
  template <int NX> struct Vnni { static constexpr auto run = int8_dot_vnni_n<BF, NX>; };
  template <int NX> struct Avx2 { static constexpr auto run = int8_dot_avx2_n<BF, NX>; };
#endif
  static Int8DotFn pick(Isa isa) {
#ifdef AFM_X86
    if (isa == Isa::Avx512Vnni) return by_row_count<Vnni>;
    if (isa == Isa::Avx2 || isa == Isa::Avx512) return by_row_count<Avx2>;
#endif
    return int8_dot_scalar<BF>;
  }
};

// One row of quantize_int8_rows, into zeroed q, scale and sums.
using QuantizeRowFn = void (*)(const float* in, int64_t k, int32_t offset, int8_t* q, float* scale,
                               int32_t* offset_sums, int32_t* block_offset_sums);

// Blocks whose largest |x| is below this are quantized as zeros: 127 / max would overflow for the
// smallest normals, and such a block adds under 2^-100 of a weight to any sum.
constexpr float kTinyBlock = 0x1p-100f;

// The block in[0, n) quantized to -levels..levels: sets `scale` (max |x| / levels) and returns
// levels / max |x|, or returns 0 for a block that stays zeros (a tiny one, scale 0, or one with a
// NaN or infinity, scale NaN, so that every product with it is NaN, as in f32).
float block_scale(const float* in, int64_t n, float levels, float& scale) {
  float max_abs = 0;
  bool finite = true;
  for (int64_t i = 0; i < n; i++) {
    finite = finite && std::isfinite(in[i]);
    max_abs = std::max(max_abs, std::fabs(in[i]));
  }
  if (!finite) scale = std::numeric_limits<float>::quiet_NaN();
  if (!finite || max_abs < kTinyBlock) return 0;
  scale = max_abs / levels;
  return levels / max_abs;
}

void quantize_int8_row_scalar(const float* in, int64_t k, int32_t offset, int8_t* q, float* scale,
                              int32_t* offset_sums, int32_t* block_offset_sums) {
  for (int64_t b0 = 0; b0 < k; b0 += kBlockFloatBlock) {
    const int64_t b1 = std::min(k, b0 + kBlockFloatBlock);
    const float inverse = block_scale(in + b0, b1 - b0, 127.0f, scale[b0 / kBlockFloatBlock]);
    if (inverse == 0) continue;
    for (int64_t i = b0; i < b1; i++) q[i] = int8_t(std::clamp(std::nearbyint(in[i] * inverse), -127.0f, 127.0f));
  }
  for (int64_t j = 0; j < block_float_blocks(k) * 4; j++) {
    offset_sums[j] = -offset * (q[4 * j] + q[4 * j + 1] + q[4 * j + 2] + q[4 * j + 3]);
    block_offset_sums[j / 4] += offset_sums[j];
  }
}

// One row of quantize_int16_rows, into zeroed q (2 bytes per value), scale and block sums.
using QuantizeInt16RowFn = void (*)(const float* in, int64_t k, int32_t offset, Int16Layout layout, int8_t* q,
                                    float* scale, int32_t* block_offset_sums);

// Where value i of block b goes: its two halves, or its two bytes.
void store_int16(int32_t v, Int16Layout layout, int8_t* block_q, int64_t i) {
  if (layout == Int16Layout::Values) {
    const auto value = int16_t(v);
    std::memcpy(block_q + 2 * i, &value, 2);
    return;
  }
  const int32_t high = (v + 128) >> 8;  // floor, so that low = v - 256 high is in -128..127
  block_q[i] = int8_t(high);
  block_q[kBlockFloatBlock + i] = int8_t(v - 256 * high);
}

void quantize_int16_row_scalar(const float* in, int64_t k, int32_t offset, Int16Layout layout, int8_t* q,
                               float* scale, int32_t* block_offset_sums) {
  for (int64_t b = 0; b * kBlockFloatBlock < k; b++) {
    const int64_t b0 = b * kBlockFloatBlock, n = std::min<int64_t>(kBlockFloatBlock, k - b0);
    const float inverse = block_scale(in + b0, n, float(kInt16Max), scale[b]);
    if (inverse == 0) continue;
    int32_t sum = 0;
    for (int64_t i = 0; i < n; i++) {
      const auto v = int32_t(std::clamp(std::nearbyint(in[b0 + i] * inverse), -float(kInt16Max), float(kInt16Max)));
      store_int16(v, layout, q + 2 * b0, i);
      sum += v;
    }
    block_offset_sums[b] = -offset * sum;
  }
}

#ifdef AFM_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see dot.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Block b of a row of k values (zeros past the end) scaled to -levels..levels and rounded to
// nearest even, as nearbyint does, into `values`; sets `scale` as block_scale does and returns
// false for a block that stays zeros.
AFM_AVX512 bool quantize_block_avx512(const float* in, int64_t k, int64_t b, float levels, float& scale,
                                      __m512i& values) {
  const int64_t n = std::min<int64_t>(kBlockFloatBlock, k - b * kBlockFloatBlock);
  const __m512 v = _mm512_maskz_loadu_ps(n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1), in + 16 * b);
  if (_mm512_fpclass_ps_mask(v, 0x99)) {  // a NaN or an infinity
    scale = std::numeric_limits<float>::quiet_NaN();
    return false;
  }
  const float max_abs = _mm512_reduce_max_ps(_mm512_abs_ps(v));
  if (max_abs < kTinyBlock) return false;
  scale = max_abs / levels;
  values = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(levels / max_abs)));
  return true;
}

// quantize_int8_row_scalar a block per vector: a prefill quantizes millions of values per matmul.
// |x| * (127 / max) cannot round past 127.
AFM_AVX512 void quantize_int8_row_avx512(const float* in, int64_t k, int32_t offset, int8_t* q, float* scale,
                                         int32_t* offset_sums, int32_t* block_offset_sums) {
  for (int64_t b = 0; b * kBlockFloatBlock < k; b++) {
    __m512i qi;
    if (!quantize_block_avx512(in, k, b, 127.0f, scale[b], qi)) continue;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * b), _mm512_cvtsepi32_epi8(qi));
    // Each 128-bit lane holds one group of 4: sum within lanes, then take one word per lane.
    __m512i sums = _mm512_add_epi32(qi, _mm512_shuffle_epi32(qi, _MM_PERM_BADC));
    sums = _mm512_add_epi32(sums, _mm512_shuffle_epi32(sums, _MM_PERM_CDAB));
    const __m128i quads = _mm512_castsi512_si128(_mm512_maskz_compress_epi32(0x1111, sums));
    const __m128i offset_quads = _mm_mullo_epi32(quads, _mm_set1_epi32(-offset));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(offset_sums + 4 * b), offset_quads);
    block_offset_sums[b] = -offset * _mm512_reduce_add_epi32(qi);
  }
}

// quantize_int16_row_scalar a block per vector (a prefill's down projection quantizes 9 M values
// per layer).
AFM_AVX512 void quantize_int16_row_avx512(const float* in, int64_t k, int32_t offset, Int16Layout layout, int8_t* q,
                                          float* scale, int32_t* block_offset_sums) {
  const __m512i most = _mm512_set1_epi32(kInt16Max), least = _mm512_set1_epi32(-kInt16Max);
  for (int64_t b = 0; b * kBlockFloatBlock < k; b++) {
    __m512i qi;
    if (!quantize_block_avx512(in, k, b, float(kInt16Max), scale[b], qi)) continue;
    qi = _mm512_max_epi32(_mm512_min_epi32(qi, most), least);
    int8_t* block_q = q + 32 * b;
    if (layout == Int16Layout::Values) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(block_q), _mm512_cvtepi32_epi16(qi));
    } else {
      const __m512i high = _mm512_srai_epi32(_mm512_add_epi32(qi, _mm512_set1_epi32(128)), 8);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(block_q), _mm512_cvtepi32_epi8(high));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(block_q + 16),
                       _mm512_cvtepi32_epi8(_mm512_sub_epi32(qi, _mm512_slli_epi32(high, 8))));
    }
    block_offset_sums[b] = -offset * _mm512_reduce_add_epi32(qi);
  }
}
#pragma GCC diagnostic pop
#endif

QuantizeRowFn quantize_row_kernel(Isa isa) {
#ifdef AFM_X86
  if (isa == Isa::Avx512 || isa == Isa::Avx512Vnni) return quantize_int8_row_avx512;
#endif
  (void)isa;
  return quantize_int8_row_scalar;
}

QuantizeInt16RowFn quantize_int16_row_kernel(Isa isa) {
#ifdef AFM_X86
  if (isa == Isa::Avx512 || isa == Isa::Avx512Vnni) return quantize_int16_row_avx512;
#endif
  (void)isa;
  return quantize_int16_row_scalar;
}

// Checks the arguments and sizes `out` for `rows` rows of k values, zeroed.
void prepare_rows(const char* what, WeightFormat format, int64_t rows, int64_t k, bool int16, Int16Layout layout,
                  Int8Rows& out) {
  if (!is_block_float(format))
    throw Error(std::string(what) + " activations: only for bfp8 and bfp4 weights, not " + format_name(format));
  out.format = format;
  out.rows = rows;
  out.k = k;
  out.int16 = int16;
  out.int16_layout = layout;
  out.padded = std::max<int64_t>(kInt8Group, (k + kInt8Group - 1) / kInt8Group * kInt8Group);
  const int64_t blocks = out.padded / kBlockFloatBlock;
  out.q.assign(rows * out.padded * (int16 ? 2 : 1), 0);
  out.scale.assign(rows * blocks, 0.0f);
  out.offset_sums.assign(int16 ? 0 : rows * out.padded / 4, 0);
  out.block_offset_sums.assign(rows * blocks, 0);
}

// Calls quantize(first row, end row) over `pool`, or on this thread without one.
template <class Quantize>
void over_rows(ThreadPool* pool, int64_t rows, int64_t k, const Quantize& quantize) {
  if (pool) pool->parallel_for(rows, 1, rows * k, quantize);
  else quantize(0, rows);
}

}  // namespace

void quantize_int8_rows(WeightFormat format, const float* x, int64_t rows, int64_t k, Int8Rows& out,
                        ThreadPool* pool, Isa isa) {
  if (!isa_supported(isa)) throw Error(std::string("int8 activations: this CPU does not support ") + isa_name(isa));
  prepare_rows("int8", format, rows, k, false, Int16Layout::Halves, out);
  const int64_t blocks = out.padded / kBlockFloatBlock;
  const int32_t offset = weight_offset(format);
  const QuantizeRowFn quantize_row = quantize_row_kernel(isa);
  over_rows(pool, rows, k, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++)
      quantize_row(x + r * k, k, offset, out.q.data() + r * out.padded, out.scale.data() + r * blocks,
                   out.offset_sums.data() + r * out.padded / 4, out.block_offset_sums.data() + r * blocks);
  });
}

void quantize_int16_rows(WeightFormat format, const float* x, int64_t rows, int64_t k, Int8Rows& out,
                         ThreadPool* pool, Int16Layout layout, Isa isa) {
  if (!isa_supported(isa)) throw Error(std::string("int16 activations: this CPU does not support ") + isa_name(isa));
  prepare_rows("int16", format, rows, k, true, layout, out);
  const int64_t blocks = out.padded / kBlockFloatBlock;
  const int32_t offset = weight_offset(format);
  const QuantizeInt16RowFn quantize_row = quantize_int16_row_kernel(isa);
  over_rows(pool, rows, k, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++)
      quantize_row(x + r * k, k, offset, layout, out.q.data() + 2 * r * out.padded, out.scale.data() + r * blocks,
                   out.block_offset_sums.data() + r * blocks);
  });
}

Int8DotFn int8_dot_kernel(WeightFormat format, Isa isa) {
  if (!isa_supported(isa)) throw Error(std::string("int8 dot kernel: this CPU does not support ") + isa_name(isa));
  if (format == WeightFormat::BFP8) return Kernels<Bfp8>::pick(isa);
  if (format == WeightFormat::BFP4) return Kernels<Bfp4>::pick(isa);
  throw Error("int8 dot kernel: only for bfp8 and bfp4 weights, not " + format_name(format));
}

}  // namespace afm::cpu
