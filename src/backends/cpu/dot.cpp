// Dot kernels for `linear`: a portable scalar version and an AVX2 version of the same loop,
// instantiated per weight format from a small "row reader" per format.
#include "backends/cpu/dot.h"

#include <bit>
#include <cstring>
#include <string>

#include "blockfloat.h"
#include "error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AFM_X86 1
// Per-function ISA, so the library builds without -march flags; callers check the CPU first.
#define AFM_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace afm::cpu {

namespace {

template <class T>
T load(const uint8_t* p) {  // weight rows may sit at any alignment inside a mapped file
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in f32
    const float v = float(man) * 0x1p-24f;
    return sign ? -v : v;
  }
  const uint32_t f32_exp = exp == 0x1F ? 0xFF : exp + (127 - 15);  // inf/nan stay inf/nan
  return std::bit_cast<float>(sign | f32_exp << 23 | man << 13);
}

// Row readers: at(i) is the portable decoder of weight i; the AVX2 section adds load16().
struct F32Row {
  const uint8_t* p;
  F32Row(const uint8_t* row, int64_t) : p(row) {}
  float at(int64_t i) const { return load<float>(p + 4 * i); }
};

struct F16Row {
  const uint8_t* p;
  F16Row(const uint8_t* row, int64_t) : p(row) {}
  float at(int64_t i) const { return f16_to_f32(load<uint16_t>(p + 2 * i)); }
};

struct BF16Row {
  const uint8_t* p;
  BF16Row(const uint8_t* row, int64_t) : p(row) {}
  float at(int64_t i) const { return std::bit_cast<float>(uint32_t(load<uint16_t>(p + 2 * i)) << 16); }
};

template <class BF>
struct BfpRow {
  const uint8_t* exps;
  const uint8_t* payloads;
  BfpRow(const uint8_t* row, int64_t k) : exps(row), payloads(row + block_float_blocks(k)) {}
  float at(int64_t i) const { return BF::value(exps, payloads, i); }
};

[[noreturn]] void bad_n_x(int n_x) {
  throw Error("dot kernel: n_x = " + std::to_string(n_x) + ", expected 1.." + std::to_string(kMaxDotRows));
}

template <class Row>
void dot_scalar(const uint8_t* w_row, const float* x, int64_t x_stride, int n_x, int64_t k, float* out) {
  if (n_x < 1 || n_x > kMaxDotRows) bad_n_x(n_x);
  const Row w(w_row, k);
  float acc[kMaxDotRows] = {};
  for (int64_t i = 0; i < k; i++) {
    const float wi = w.at(i);
    for (int j = 0; j < n_x; j++) acc[j] += wi * x[j * x_stride + i];
  }
  for (int j = 0; j < n_x; j++) out[j] = acc[j];
}

#ifdef AFM_X86

// load16 decodes weights i..i+15 (i a multiple of 16) into two vectors of 8.
AFM_AVX2 inline void load16(const F32Row& w, int64_t i, __m256 v[2]) {
  v[0] = _mm256_loadu_ps(reinterpret_cast<const float*>(w.p) + i);
  v[1] = _mm256_loadu_ps(reinterpret_cast<const float*>(w.p) + i + 8);
}

AFM_AVX2 inline void load16(const F16Row& w, int64_t i, __m256 v[2]) {
  v[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.p + 2 * i)));
  v[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.p + 2 * i + 16)));
}

AFM_AVX2 inline __m256 bf16x8_to_f32(const uint8_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

AFM_AVX2 inline void load16(const BF16Row& w, int64_t i, __m256 v[2]) {
  v[0] = bf16x8_to_f32(w.p + 2 * i);
  v[1] = bf16x8_to_f32(w.p + 2 * i + 16);
}

// 16 signed magnitudes (int8, in value order) times the block's scale.
AFM_AVX2 inline void scale16(__m128i mags, float scale, __m256 v[2]) {
  const __m256 s = _mm256_set1_ps(scale);
  v[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(mags)), s);
  v[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(mags, mags))), s);
}

AFM_AVX2 inline void load16(const BfpRow<Bfp8>& w, int64_t i, __m256 v[2]) {
  const int64_t b = i / kBlockFloatBlock;
  const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.payloads + b * Bfp8::payload_bytes));
  // Sign-magnitude to two's complement: psignb negates the magnitude where the code is negative.
  const __m128i mags = _mm_sign_epi8(_mm_and_si128(codes, _mm_set1_epi8(0x7F)), codes);
  scale16(mags, Bfp8::scale[w.exps[b]], v);
}

AFM_AVX2 inline void load16(const BfpRow<Bfp4>& w, int64_t i, __m256 v[2]) {
  const int64_t b = i / kBlockFloatBlock;
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.payloads + b * Bfp4::payload_bytes));
  const __m128i nibble = _mm_set1_epi8(0x0F);
  // Low nibbles hold values 0..7, high nibbles values 8..15 (see blockfloat.h).
  const __m128i codes = _mm_unpacklo_epi64(_mm_and_si128(bytes, nibble),
                                           _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
  // A 4-bit code (sign in bit 3) to its signed magnitude by table lookup.
  const __m128i table = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, -1, -2, -3, -4, -5, -6, -7);
  scale16(_mm_shuffle_epi8(table, codes), Bfp4::scale[w.exps[b]], v);
}

AFM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// acc_lo[j] += w[0] * x_j[0..8), acc_hi[j] += w[1] * x_j[8..16) for each activation row j.
template <int NX>
AFM_AVX2 inline void fma16(const __m256 w[2], const float* x, int64_t x_stride, __m256* acc_lo, __m256* acc_hi) {
#pragma GCC unroll 4
  for (int j = 0; j < NX; j++) {
    acc_lo[j] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x + j * x_stride), acc_lo[j]);
    acc_hi[j] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + j * x_stride + 8), acc_hi[j]);
  }
}

template <class Row, int NX>
AFM_AVX2 void dot_avx2_n(const Row& w, const float* x, int64_t x_stride, int64_t k, float* out) {
  // With few activation rows, two 16-wide chunks per step give 4 independent FMA chains per row,
  // so the loop is not bound by FMA latency; with more rows that many accumulators would spill.
  constexpr int kChunks = NX <= 2 ? 2 : 1;
  __m256 acc[2 * kChunks][NX];
  for (auto& a : acc) {
    for (auto& v : a) v = _mm256_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 * kChunks <= k; i += 16 * kChunks) {
#pragma GCC unroll 2
    for (int c = 0; c < kChunks; c++) {
      __m256 v[2];
      load16(w, i + 16 * c, v);
      fma16<NX>(v, x + i + 16 * c, x_stride, acc[2 * c], acc[2 * c + 1]);
    }
  }
  if (kChunks > 1 && i + 16 <= k) {
    __m256 v[2];
    load16(w, i, v);
    fma16<NX>(v, x + i, x_stride, acc[0], acc[1]);
    i += 16;
  }
  for (int j = 0; j < NX; j++) {
    __m256 sum = acc[0][j];
    for (int a = 1; a < 2 * kChunks; a++) sum = _mm256_add_ps(sum, acc[a][j]);
    float tail = 0.0f;  // the last k % 16 columns
    for (int64_t t = i; t < k; t++) tail += w.at(t) * x[j * x_stride + t];
    out[j] = hsum(sum) + tail;
  }
}

template <class Row>
AFM_AVX2 void dot_avx2(const uint8_t* w_row, const float* x, int64_t x_stride, int n_x, int64_t k, float* out) {
  const Row w(w_row, k);
  switch (n_x) {
    case 1: return dot_avx2_n<Row, 1>(w, x, x_stride, k, out);
    case 2: return dot_avx2_n<Row, 2>(w, x, x_stride, k, out);
    case 3: return dot_avx2_n<Row, 3>(w, x, x_stride, k, out);
    case 4: return dot_avx2_n<Row, 4>(w, x, x_stride, k, out);
    default: bad_n_x(n_x);
  }
}

#endif  // AFM_X86

template <class Row>
DotFn pick(Isa isa) {
#ifdef AFM_X86
  if (isa == Isa::Avx2) return dot_avx2<Row>;
#endif
  return dot_scalar<Row>;
}

}  // namespace

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2:
#ifdef AFM_X86
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
      return false;
#endif
  }
  return false;
}

Isa best_isa() {
  static const Isa best = isa_supported(Isa::Avx2) ? Isa::Avx2 : Isa::Scalar;
  return best;
}

const char* isa_name(Isa isa) { return isa == Isa::Avx2 ? "avx2" : "scalar"; }

DotFn dot_kernel(WeightFormat format, Isa isa) {
  if (!isa_supported(isa)) throw Error(std::string("dot kernel: this CPU does not support ") + isa_name(isa));
  switch (format) {
    case WeightFormat::F32: return pick<F32Row>(isa);
    case WeightFormat::F16: return pick<F16Row>(isa);
    case WeightFormat::BF16: return pick<BF16Row>(isa);
    case WeightFormat::BFP8: return pick<BfpRow<Bfp8>>(isa);
    case WeightFormat::BFP4: return pick<BfpRow<Bfp4>>(isa);
  }
  throw Error("dot kernel: unknown weight format");
}

}  // namespace afm::cpu
