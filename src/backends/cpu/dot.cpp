// Dot kernels for `linear`: a portable scalar version and AVX2 and AVX-512 versions of the same
// loop, instantiated per weight format from a small "row reader" per format.
#include "backends/cpu/dot.h"

#include <array>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>

#include "backends/cpu/cpu_features.h"
#include "backends/cpu/row_count.h"
#include "backends/cpu/simd.h"
#include "blockfloat.h"
#include "error.h"

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

// Row readers: at(i) is the portable decoder of weight i, stream(i) the address of its bytes
// (for prefetching); the SIMD sections add load16().
// Block-float readers set kBlockScaled: load16 then yields the signed magnitudes of one block,
// which the kernel scales once per block after summing their products with x.
struct F32Row {
  static constexpr bool kBlockScaled = false;
  const uint8_t* p;
  F32Row(const uint8_t* row, int64_t) : p(row) {}
  float at(int64_t i) const { return load<float>(p + 4 * i); }
  const uint8_t* stream(int64_t i) const { return p + 4 * i; }
};

struct F16Row {
  static constexpr bool kBlockScaled = false;
  const uint8_t* p;
  F16Row(const uint8_t* row, int64_t) : p(row) {}
  float at(int64_t i) const { return f16_to_f32(load<uint16_t>(p + 2 * i)); }
  const uint8_t* stream(int64_t i) const { return p + 2 * i; }
};

struct BF16Row {
  static constexpr bool kBlockScaled = false;
  const uint8_t* p;
  BF16Row(const uint8_t* row, int64_t) : p(row) {}
  float at(int64_t i) const { return std::bit_cast<float>(uint32_t(load<uint16_t>(p + 2 * i)) << 16); }
  const uint8_t* stream(int64_t i) const { return p + 2 * i; }
};

template <class BF>
struct BfpRow {
  static constexpr bool kBlockScaled = true;
  const uint8_t* exps;
  const uint8_t* payloads;
  BfpRow(const uint8_t* row, int64_t k) : exps(row), payloads(row + block_float_blocks(k)) {}
  float at(int64_t i) const { return BF::value(exps, payloads, i); }
  float scale(int64_t i) const { return BF::scale[exps[i / kBlockFloatBlock]]; }
  const uint8_t* payload(int64_t i) const { return payloads + i / kBlockFloatBlock * BF::payload_bytes; }
  const uint8_t* stream(int64_t i) const { return payload(i); }
};

template <class Row>
void dot_scalar(const uint8_t* w_row, const float* x, int64_t x_stride, int n_x, int64_t k, float* out) {
  if (n_x < 1 || n_x > kMaxDotRows) bad_row_count("dot kernel", n_x);
  const Row w(w_row, k);
  float acc[kMaxDotRows] = {};
  for (int64_t i = 0; i < k; i++) {
    const float wi = w.at(i);
    for (int j = 0; j < n_x; j++) acc[j] += wi * x[j * x_stride + i];
  }
  for (int j = 0; j < n_x; j++) out[j] = acc[j];
}

template <class Row>
void decode_scalar(const uint8_t* w_row, int64_t k, int64_t begin, int64_t count, float* dst) {
  const Row w(w_row, k);
  for (int64_t i = 0; i < count; i++) dst[i] = w.at(begin + i);
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

// 8 int8 (low half of m) to f32.
AFM_AVX2 inline __m256 i8x8_to_f32(__m128i m) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(m)); }

AFM_AVX2 inline void load16(const BfpRow<Bfp8>& w, int64_t i, __m256 v[2]) {
  const uint8_t* p = w.payload(i);  // int8 magnitudes, widened straight from memory
  v[0] = i8x8_to_f32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  v[1] = i8x8_to_f32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
}

AFM_AVX2 inline void load16(const BfpRow<Bfp4>& w, int64_t i, __m256 v[2]) {
  // Each byte sign-extended to int32 holds value j in bits 0-3 and value j + 8 in bits 4-31.
  const __m256i bytes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.payload(i))));
  v[0] = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(bytes, 28), 28));
  v[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(bytes, 4));
}

// Adds weights i..i+15 times x_j[i..i+16) to the accumulators of each activation row j.
template <int NX, class Row>
AFM_AVX2 inline void fma16(const Row& w, int64_t i, const float* x, int64_t x_stride, __m256* acc_lo,
                           __m256* acc_hi) {
  __m256 v[2];
  load16(w, i, v);
  x += i;
  if constexpr (Row::kBlockScaled) {
    // One multiply by the block scale per row instead of two per block of weights.
    const __m256 scale = _mm256_set1_ps(w.scale(i));
#pragma GCC unroll 4
    for (int j = 0; j < NX; j++) {
      const __m256 sum = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + j * x_stride + 8),
                                         _mm256_mul_ps(v[0], _mm256_loadu_ps(x + j * x_stride)));
      acc_lo[j] = _mm256_fmadd_ps(sum, scale, acc_lo[j]);
    }
  } else {
#pragma GCC unroll 4
    for (int j = 0; j < NX; j++) {
      acc_lo[j] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(x + j * x_stride), acc_lo[j]);
      acc_hi[j] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + j * x_stride + 8), acc_hi[j]);
    }
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
    for (int c = 0; c < kChunks; c++) fma16<NX>(w, i + 16 * c, x, x_stride, acc[2 * c], acc[2 * c + 1]);
  }
  if (kChunks > 1 && i + 16 <= k) {
    fma16<NX>(w, i, x, x_stride, acc[0], acc[1]);
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
AFM_AVX2 void decode_avx2(const uint8_t* w_row, int64_t k, int64_t begin, int64_t count, float* dst) {
  const Row w(w_row, k);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    __m256 v[2];
    load16(w, begin + i, v);
    if constexpr (Row::kBlockScaled) {
      const __m256 scale = _mm256_set1_ps(w.scale(begin + i));
      v[0] = _mm256_mul_ps(v[0], scale);
      v[1] = _mm256_mul_ps(v[1], scale);
    }
    _mm256_storeu_ps(dst + i, v[0]);
    _mm256_storeu_ps(dst + i + 8, v[1]);
  }
  for (; i < count; i++) dst[i] = w.at(begin + i);
}

// AVX-512: the same loop with 16 f32 lanes, so one block of 16 weights is one zmm. The last
// k % 16 columns go through the same step with masked loads, which read nothing past the row.

// GCC 12's AVX-512 headers fill "undefined" pass-through operands with a self-initialised
// variable, which -Wuninitialized reports at every inlined use (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// load16 decodes weights i..i+15 (i a multiple of 16) into one vector; lanes outside `m` are 0.
AFM_AVX512 inline __m512 load16(const F32Row& w, int64_t i, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(w.p) + i);
}

AFM_AVX512 inline __m512 load16(const F16Row& w, int64_t i, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w.p + 2 * i));
}

AFM_AVX512 inline __m512 load16(const BF16Row& w, int64_t i, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w.p + 2 * i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// Block-float payloads are whole blocks (a short last block is padded with zero magnitudes), so
// they need no mask.
AFM_AVX512 inline __m512 load16(const BfpRow<Bfp8>& w, int64_t i, __mmask16) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.payload(i)))));
}

AFM_AVX512 inline __m512 load16(const BfpRow<Bfp4>& w, int64_t i, __mmask16) {
  // The 8 payload bytes go to both halves; lanes 0-7 keep each byte's low nibble (shifted to the
  // top, then arithmetically back), lanes 8-15 its high nibble.
  const __m512i bytes = _mm512_cvtepi8_epi32(_mm_set1_epi64x(load<int64_t>(w.payload(i))));
  const __m512i to_top = _mm512_setr_epi32(28, 28, 28, 28, 28, 28, 28, 28, 24, 24, 24, 24, 24, 24, 24, 24);
  return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_sllv_epi32(bytes, to_top), 28));
}

// Adds weights i..i+15 (lanes in m) times x_j[i..i+16) to the accumulator of each activation row j.
template <int NX, class Row>
AFM_AVX512 inline void fma16(const Row& w, int64_t i, __mmask16 m, const float* x, int64_t x_stride, __m512* acc) {
  __m512 v = load16(w, i, m);
  // Scaling the integer magnitudes is exact (the scale is a power of two, and a subnormal one
  // still holds 7 bits), and with one vector per block it costs one multiply for all NX rows.
  if constexpr (Row::kBlockScaled) v = _mm512_mul_ps(v, _mm512_set1_ps(w.scale(i)));
#pragma GCC unroll 4
  for (int j = 0; j < NX; j++) acc[j] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, x + j * x_stride + i), acc[j]);
}

template <class Row, int NX>
AFM_AVX512 void dot_avx512_n(const Row& w, const float* x, int64_t x_stride, int64_t k, float* out) {
  // Two independent FMA chains per row: with the decoding between them they cover the FMA
  // latency, and every row count sums in the same order, so a token's result does not depend on
  // how many others share the call (the sequences of a batched decode step).
  constexpr int kChunks = 2;
  // Decode from memory is only bandwidth-bound if the loads are in flight well before the
  // decoding reaches them: without this prefetch (the hardware prefetcher alone) bfp8 decode
  // ran at about 0.6x the speed (bench_dot). Prefetching past the row's end is harmless.
  constexpr int64_t kPrefetchAhead = 2048;  // bytes of the row's main stream
  // Every loop over acc is unrolled, so the accumulators stay in registers.
  __m512 acc[kChunks][NX];
#pragma GCC unroll 4
  for (int c = 0; c < kChunks; c++) {
#pragma GCC unroll 4
    for (int j = 0; j < NX; j++) acc[c][j] = _mm512_setzero_ps();
  }
  int64_t i = 0;
  for (; i + 16 * kChunks <= k; i += 16 * kChunks) {
    _mm_prefetch(reinterpret_cast<const char*>(w.stream(i)) + kPrefetchAhead, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int c = 0; c < kChunks; c++) fma16<NX>(w, i + 16 * c, 0xFFFF, x, x_stride, acc[c]);
  }
  for (; i < k; i += 16) {
    const __mmask16 m = k - i >= 16 ? 0xFFFF : __mmask16((1u << (k - i)) - 1);
    fma16<NX>(w, i, m, x, x_stride, acc[0]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < NX; j++) {
    __m512 sum = acc[0][j];
#pragma GCC unroll 4
    for (int c = 1; c < kChunks; c++) sum = _mm512_add_ps(sum, acc[c][j]);
    out[j] = _mm512_reduce_add_ps(sum);
  }
}

template <class Row>
AFM_AVX512 void decode_avx512(const uint8_t* w_row, int64_t k, int64_t begin, int64_t count, float* dst) {
  const Row w(w_row, k);
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 m = count - i >= 16 ? 0xFFFF : __mmask16((1u << (count - i)) - 1);
    __m512 v = load16(w, begin + i, m);
    if constexpr (Row::kBlockScaled) v = _mm512_mul_ps(v, _mm512_set1_ps(w.scale(begin + i)));
    _mm512_mask_storeu_ps(dst + i, m, v);
  }
}


#pragma GCC diagnostic pop

#endif  // AFM_X86

// A DotFn over Kernel<NX>::run, which takes the row reader.
template <class Row, template <int> class Kernel>
void by_row_count(const uint8_t* w_row, const float* x, int64_t x_stride, int n_x, int64_t k, float* out) {
  run_for_row_count<Kernel>("dot kernel", n_x, Row(w_row, k), x, x_stride, k, out);
}

struct Kernels {
  DotFn dot;
  DecodeFn decode;
};

template <class Row>
struct RowKernels {
#ifdef AFM_X86
  template <int NX> struct Avx2 { static constexpr auto run = dot_avx2_n<Row, NX>; };
  template <int NX> struct Avx512 { static constexpr auto run = dot_avx512_n<Row, NX>; };
#endif
  static Kernels pick(Isa isa) {
#ifdef AFM_X86
    if (isa == Isa::Avx2) return {by_row_count<Row, Avx2>, decode_avx2<Row>};
    if (isa == Isa::Avx512 || isa == Isa::Avx512Vnni) return {by_row_count<Row, Avx512>, decode_avx512<Row>};
#endif
    return {dot_scalar<Row>, decode_scalar<Row>};
  }
};

Kernels kernels(WeightFormat format, Isa isa) {
  if (!isa_supported(isa)) throw Error(std::string("dot kernel: this CPU does not support ") + isa_name(isa));
  switch (format) {
    case WeightFormat::F32: return RowKernels<F32Row>::pick(isa);
    case WeightFormat::F16: return RowKernels<F16Row>::pick(isa);
    case WeightFormat::BF16: return RowKernels<BF16Row>::pick(isa);
    case WeightFormat::BFP8: return RowKernels<BfpRow<Bfp8>>::pick(isa);
    case WeightFormat::BFP4: return RowKernels<BfpRow<Bfp4>>::pick(isa);
  }
  throw Error("dot kernel: unknown weight format");
}

}  // namespace

namespace {

bool cpu_supports(Isa isa) {
#ifdef AFM_X86
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return avx2;
    case Isa::Avx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::Avx512Vnni: return cpu_supports(Isa::Avx512) && __builtin_cpu_supports("avx512vnni");
  }
#endif
  return isa == Isa::Scalar;
}

}  // namespace

// Asked by every kernel call (attention per sequence and layer, among others): answered from a
// table made once.
bool isa_supported(Isa isa) {
  static const std::array<bool, std::size(kAllIsas)> supported = [] {
    std::array<bool, std::size(kAllIsas)> table{};
    for (Isa i : kAllIsas) table[size_t(i)] = cpu_supports(i);
    return table;
  }();
  return size_t(isa) < supported.size() && supported[size_t(isa)];
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Vnni: return "avx512vnni";
  }
  return "?";
}

Isa choose_isa(const char* requested) {
  if (requested == nullptr || *requested == '\0') {
    for (Isa isa : {Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2}) {
      if (isa_supported(isa)) return isa;
    }
    return Isa::Scalar;
  }
  for (Isa isa : kAllIsas) {
    if (std::string(requested) != isa_name(isa)) continue;
    if (!isa_supported(isa)) throw Error(std::string("AFM_ISA=") + requested + ": this CPU does not support it");
    return isa;
  }
  throw Error(std::string("AFM_ISA=") + requested + ": expected scalar, avx2, avx512 or avx512vnni");
}

Isa best_isa() {
  static const Isa best = choose_isa(std::getenv("AFM_ISA"));
  return best;
}

DotFn dot_kernel(WeightFormat format, Isa isa) { return kernels(format, isa).dot; }

DecodeFn decode_kernel(WeightFormat format, Isa isa) { return kernels(format, isa).decode; }

}  // namespace afm::cpu
