// Each thread takes a block of weight rows and, for one slice of kDepth columns at a time, packs
// it into panels of 32 rows: a panel holds, per 4 columns, the 32 rows' 4 weight bytes (one
// vector of 16 rows twice), and per block of 16 columns the rows' exponents as floats. A
// micro-kernel keeps a tile of up to 6 tokens x 32 rows in registers: per 4 columns it loads the
// panel's 2 vectors and broadcasts each token's 4 int8 values, 2 `vpdpbusd` per broadcast; at
// the end of each block it converts the integer sums and adds them, scaled, into f32 sums.
// Int16 activations take only panels packed at load: in halves (int8_dot.h) up to 4 tokens and 2
// `vpdpbusd` per broadcast pair; as values, a slice widened to int16 once and up to 6 tokens, one
// `vpdpwssd` per 2 columns.
//
// bfp8 and bfp4 weights uploaded for int8 or int16 activations are packed once, at load
// (int8_panels): every panel of the matrix in one buffer, slice by slice, so a matmul reads its
// weights as one forward stream and packs nothing.
#include "backends/cpu/int8_gemm.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "backends/cpu/cpu_features.h"
#include "backends/cpu/int8_weights.h"
#include "backends/cpu/simd.h"
#include "backends/cpu/panels.h"
#include "blockfloat.h"
#include "error.h"
#include "parallel_for.h"

namespace afm::cpu {

namespace {

constexpr int64_t kPanelRows = 32;     // two vectors of 16 rows
constexpr int64_t kDepth = 256;        // columns packed at a time (a multiple of kInt8Group)
constexpr int64_t kBlockRows = 256;    // weight rows a thread packs at a time (at most)
constexpr int kMaxTokens = 6;          // 4 x 6 accumulators + the panel's vectors fit 32 registers
constexpr int kMaxInt16Tokens = 4;     // 6 x 4 with int16 halves' high sums
// From this many tokens int16 values beat halves, the widening of each slice included: at 8-16
// tokens the two were even or halves ahead, from 32 on values were 1.02-1.4x faster on a Xeon
// (bench_gemm's Int16Gemm).
constexpr int64_t kInt16ValuesMinTokens = 32;
// From this many tokens a thread's panels are multiplied together, slice by slice (gemm_panels).
constexpr int64_t kPanelGroupMinTokens = 32;
constexpr int64_t kQuadBytes = 4 * kPanelRows;  // one panel's 4 columns
constexpr int64_t kWidenedPairBytes = 2 * kPanelRows * 2;  // 2 columns of 32 rows as int16

// A tile's view of the quantized activations: tokens t0.. and the slice's first column.
struct XTile {
  const int8_t* q;            // token t's values: q + t * q_stride
  const float* scale;         // token t's block scales: scale + t * block_stride
  const int32_t* offsets;     // token t's block offset sums, the same stride
  int64_t q_stride, block_stride;
};

#ifdef AFM_X86

// Whether a matmul fetches each slice's successor in the panel stream while it multiplies the
// slice. On a Xeon (Emerald Rapids) the hardware prefetchers alone left decode waiting on L1
// misses, and this made decode 1.15x (bfp8) and 1.2x (bfp4) faster; on a Zen 4 prefetches in this
// loop made it slower, so other vendors go without (docs/PERFORMANCE.md).
const bool kPrefetchNextSlice = cpu_is_intel();

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 headers (see dot.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// What a micro-kernel multiplies: the panel's bytes by int8 activations or by int16 ones in halves,
// or the slice widened to int16 (widen_quads) by int16 values.
enum class Products { Int8, Int16Halves, Int16Values };

// out[t][r] (+)= the tile's sums over `blocks` blocks of the panel, for t < Tokens and rows below
// `rows`. A Nibbles panel (bfp4 packed at load) holds two quads per 128 bytes, the even one in
// the low nibbles.
// Int16 halves take two `vpdpbusd` per weight vector, one per half, and add the high sums, times
// 256, to the low ones at the end of the block. Int16 values take, per quad, its two pairs of
// columns widened, and one `vpdpwssd` per pair and 16 rows: the same integer sums.
template <int Tokens, bool Nibbles, Products P>
AFM_AVX512_VNNI void micro(const XTile& x, const uint8_t* panel, const float* exponents, int64_t blocks, float* out,
                           int64_t out_stride, int64_t rows, bool accumulate) {
  constexpr bool kHalves = P == Products::Int16Halves;
  constexpr int kHighs = kHalves ? Tokens : 0;
  constexpr int64_t kBlockValues = P == Products::Int8 ? kBlockFloatBlock : 2 * kBlockFloatBlock;  // bytes of x per block
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512i pair0 = _mm512_setzero_si512(), pair1 = _mm512_setzero_si512();
  __m512 acc[Tokens][2];
#pragma GCC unroll 6
  for (int t = 0; t < Tokens; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    __m512i sum[Tokens][2], high[kHighs > 0 ? kHighs : 1][2];
#pragma GCC unroll 6
    for (int t = 0; t < Tokens; t++) sum[t][0] = sum[t][1] = _mm512_set1_epi32(x.offsets[t * x.block_stride + b]);
#pragma GCC unroll 6
    for (int t = 0; t < kHighs; t++) high[t][0] = high[t][1] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int s = 0; s < 4; s++) {
      if constexpr (P == Products::Int16Values) {
        const uint8_t* pairs = panel + (4 * b + s) * 2 * kWidenedPairBytes;
        for (int h = 0; h < 2; h++) {
          const __m512i w0 = _mm512_loadu_si512(pairs + h * kWidenedPairBytes);
          const __m512i w1 = _mm512_loadu_si512(pairs + h * kWidenedPairBytes + 64);
#pragma GCC unroll 6
          for (int t = 0; t < Tokens; t++) {
            int32_t two;
            std::memcpy(&two, x.q + t * x.q_stride + kBlockValues * b + 8 * s + 4 * h, 4);
            const __m512i xb = _mm512_set1_epi32(two);
            sum[t][0] = _mm512_dpwssd_epi32(sum[t][0], xb, w0);
            sum[t][1] = _mm512_dpwssd_epi32(sum[t][1], xb, w1);
          }
        }
        continue;
      }
      __m512i w0, w1;
      if constexpr (Nibbles) {
        if (s % 2 == 0) {
          const uint8_t* pair = panel + (2 * b + s / 2) * kQuadBytes;
          pair0 = _mm512_loadu_si512(pair), pair1 = _mm512_loadu_si512(pair + 64);
          w0 = _mm512_and_si512(pair0, nibble), w1 = _mm512_and_si512(pair1, nibble);
        } else {
          w0 = _mm512_and_si512(_mm512_srli_epi16(pair0, 4), nibble);
          w1 = _mm512_and_si512(_mm512_srli_epi16(pair1, 4), nibble);
        }
      } else {
        const uint8_t* quad = panel + (4 * b + s) * kQuadBytes;
        w0 = _mm512_loadu_si512(quad), w1 = _mm512_loadu_si512(quad + 64);
      }
#pragma GCC unroll 6
      for (int t = 0; t < Tokens; t++) {
        const int8_t* xq = x.q + t * x.q_stride + kBlockValues * b + 4 * s;
        int32_t four;
        if constexpr (kHalves) {
          std::memcpy(&four, xq, 4);
          const __m512i xh = _mm512_set1_epi32(four);
          high[t][0] = _mm512_dpbusd_epi32(high[t][0], w0, xh);
          high[t][1] = _mm512_dpbusd_epi32(high[t][1], w1, xh);
          xq += kBlockFloatBlock;  // the low halves
        }
        std::memcpy(&four, xq, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        sum[t][0] = _mm512_dpbusd_epi32(sum[t][0], w0, xb);
        sum[t][1] = _mm512_dpbusd_epi32(sum[t][1], w1, xb);
      }
    }
#pragma GCC unroll 6
    for (int t = 0; t < kHighs; t++)
      for (int h = 0; h < 2; h++) sum[t][h] = _mm512_add_epi32(sum[t][h], _mm512_slli_epi32(high[t][h], 8));
    // sum * 2^(e - bias) exactly, times x's block scale, into the f32 sums.
    const __m512 e0 = _mm512_loadu_ps(exponents + kPanelRows * b), e1 = _mm512_loadu_ps(exponents + kPanelRows * b + 16);
#pragma GCC unroll 6
    for (int t = 0; t < Tokens; t++) {
      const __m512 xs = _mm512_set1_ps(x.scale[t * x.block_stride + b]);
      acc[t][0] = _mm512_fmadd_ps(_mm512_scalef_ps(_mm512_cvtepi32_ps(sum[t][0]), e0), xs, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(_mm512_scalef_ps(_mm512_cvtepi32_ps(sum[t][1]), e1), xs, acc[t][1]);
    }
  }
#pragma GCC unroll 6
  for (int t = 0; t < Tokens; t++) store_panel_row(out + t * out_stride, acc[t][0], acc[t][1], rows, accumulate);
}

// The exponent bytes of blocks [b0, b0 + count) of `rows` (<= 32) weight rows as [block][32 rows],
// each through `convert`; rows past `rows` and blocks past `blocks` get zero.
template <class T, class Convert>
void transpose_exponents(const uint8_t* w_row, int64_t row_bytes, int64_t rows, int64_t blocks, int64_t b0,
                         int64_t count, T* out, Convert convert) {
  for (int64_t b = 0; b < count; b++)
    for (int64_t r = 0; r < kPanelRows; r++)
      out[b * kPanelRows + r] = r < rows && b0 + b < blocks ? convert(w_row[r * row_bytes + b0 + b]) : T(0);
}

// Packs columns [k0, k0 + groups * 64) of `rows` (<= 32) weight rows, the first at `w_row`, into
// one panel: its quads ([groups * 16][32 rows] words) and, unless null, exponents ([groups * 4]
// [32 rows]). Rows past `rows` are zeros (their outputs are never stored).
template <class BF>
AFM_AVX512_VNNI void pack(const uint8_t* w_row, int64_t row_bytes, int64_t rows, int64_t blocks, int64_t k0,
                          int64_t groups, uint8_t* quads, float* exponents) {
  alignas(64) uint32_t staged[kPanelRows][16];  // one group of every row: 16 words of 4 bytes
  const int64_t g0 = k0 / kInt8Group, b0 = k0 / kBlockFloatBlock;
  if (exponents)
    transpose_exponents(w_row, row_bytes, rows, blocks, b0, 4 * groups, exponents,
                        [](uint8_t e) { return float(e) - kExponentBias<BF>; });
  // Rows lie row_bytes apart, more streams than the hardware prefetcher follows: each load also
  // fetches the same row's bytes for the next slice, which this thread packs after a whole pass of
  // the tokens over this one.
  constexpr int64_t kGroupBytes = 4 * BF::payload_bytes, kNextSlice = kDepth / kInt8Group * kGroupBytes;
  for (int64_t r = 0; r < rows; r++)
    _mm_prefetch(reinterpret_cast<const char*>(w_row + r * row_bytes + b0 + kDepth / kBlockFloatBlock), _MM_HINT_T1);
  for (int64_t g = 0; g < groups; g++) {
    for (int64_t r = 0; r < kPanelRows; r++) {
      const uint8_t* payloads = w_row + r * row_bytes + blocks;
      __m512i v = _mm512_setzero_si512();
      if (r < rows) {
        v = load_offset_weights<BF>(payloads, g0 + g, blocks - 4 * (g0 + g));
        _mm_prefetch(reinterpret_cast<const char*>(payloads + (g0 + g) * kGroupBytes + kNextSlice), _MM_HINT_T1);
      }
      _mm512_store_si512(staged[r], v);
    }
    // Word c of row r goes to quad (16 g + c), lane r.
    for (int64_t half = 0; half < 2; half++)
      transpose16(reinterpret_cast<const float*>(staged[16 * half]), 16,
                  reinterpret_cast<float*>(quads + 16 * g * kQuadBytes + 64 * half), kQuadBytes / 4);
  }
}

// The packed layout of int8_panels: panel p (weight rows 32 p to 32 p + 31, zeros past the last)
// is one slice of kDepth columns after another (the last may be narrower), and a slice is its
// exponent bytes as stored, [columns / 16][32 rows], then its quads, [columns / 4][32 rows]
// [4 bytes] (bfp4: two quads in the nibbles of one, [columns / 8][32 rows][4 bytes]). A matmul
// that walks the slices in order reads the panel as one forward stream, which the hardware
// prefetchers follow (exponents after the quads, read first, made decode 2x slower).
template <class BF>
int64_t quad_bytes(int64_t columns) { return columns * kPanelRows * BF::payload_bytes / kBlockFloatBlock; }
// The bytes of `columns` columns of a panel, so also the offset of the slice that starts at column
// `columns` (a multiple of kDepth).
template <class BF>
int64_t panel_bytes(int64_t columns) { return quad_bytes<BF>(columns) + columns / kBlockFloatBlock * kPanelRows; }

// A panel's weight rows (up to 32, w.rows of them) into `panel`.
template <class BF>
AFM_AVX512_VNNI void pack_whole_panel(const Weight& w, int64_t padded, uint8_t* panel) {
  const int64_t blocks = block_float_blocks(w.cols), rows = w.rows;
  const uint8_t* w_row = w.data;
  thread_local std::vector<uint8_t> byte_quads;  // bfp4's a byte per weight, before pairing
  for (int64_t k0 = 0; k0 < padded; k0 += kDepth) {
    const int64_t columns = std::min(kDepth, padded - k0);
    uint8_t* slice_exponents = panel + panel_bytes<BF>(k0);
    uint8_t* slice = slice_exponents + columns / kBlockFloatBlock * kPanelRows;
    if constexpr (BF::mag_bits == 7) {
      pack<BF>(w_row, w.row_bytes, rows, blocks, k0, columns / kInt8Group, slice, nullptr);
    } else {
      byte_quads.resize(columns * kPanelRows);
      pack<BF>(w_row, w.row_bytes, rows, blocks, k0, columns / kInt8Group, byte_quads.data(), nullptr);
      for (int64_t pair = 0; pair < columns / 8; pair++)
        for (int64_t i = 0; i < kQuadBytes; i++)
          slice[pair * kQuadBytes + i] = uint8_t(byte_quads[2 * pair * kQuadBytes + i] |
                                                 byte_quads[(2 * pair + 1) * kQuadBytes + i] << 4);
    }
    transpose_exponents(w_row, w.row_bytes, rows, blocks, k0 / kBlockFloatBlock, columns / kBlockFloatBlock,
                        slice_exponents, [](uint8_t e) { return e; });
  }
}

using MicroFn = void (*)(const XTile&, const uint8_t*, const float*, int64_t, float*, int64_t, int64_t, bool);

template <bool Nibbles, Products P, size_t... I>
constexpr std::array<MicroFn, kMaxTokens> micro_table(std::index_sequence<I...>) {
  return {micro<int(I) + 1, Nibbles, P>...};
}
constexpr auto kMicro = micro_table<false, Products::Int8>(std::make_index_sequence<kMaxTokens>());
constexpr auto kNibbleMicro = micro_table<true, Products::Int8>(std::make_index_sequence<kMaxTokens>());
constexpr auto kInt16Micro = micro_table<false, Products::Int16Halves>(std::make_index_sequence<kMaxInt16Tokens>());
constexpr auto kInt16NibbleMicro = micro_table<true, Products::Int16Halves>(std::make_index_sequence<kMaxInt16Tokens>());
constexpr auto kInt16ValuesMicro = micro_table<false, Products::Int16Values>(std::make_index_sequence<kMaxTokens>());

// `pairs` pairs of quads from a Nibbles panel into `quads`, a byte per weight.
AFM_AVX512_VNNI void split_nibbles(const uint8_t* pairs_in, int64_t pairs, uint8_t* quads) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t i = 0; i < pairs * kQuadBytes; i += 64) {
    const __m512i both = _mm512_loadu_si512(pairs_in + i);
    const int64_t pair = i / kQuadBytes, half = i % kQuadBytes;
    _mm512_storeu_si512(quads + 2 * pair * kQuadBytes + half, _mm512_and_si512(both, nibble));
    _mm512_storeu_si512(quads + (2 * pair + 1) * kQuadBytes + half,
                       _mm512_and_si512(_mm512_srli_epi16(both, 4), nibble));
  }
}

// `quads` quads of a slice (bytes, or a Nibbles panel's pairs) into `widened`, each weight as an
// int16 (its unsigned byte, so the offset sums still cancel it): per quad, columns 0-1 then 2-3,
// each [32 rows][2 values], which is what `vpdpwssd` multiplies.
template <bool Nibbles>
AFM_AVX512_VNNI void widen_quads(const uint8_t* panel_quads, int64_t quads, uint8_t* widened) {
  // Per 32-bit lane of 4 column bytes: columns 0 and 1 as words, or columns 2 and 3 (-1 makes zeros).
  const __m512i first = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
  const __m512i second = _mm512_broadcast_i32x4(_mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t q = 0; q < quads; q++)
    for (int64_t half = 0; half < 2; half++) {  // rows 0-15, rows 16-31
      __m512i bytes;
      if constexpr (Nibbles) {
        const __m512i both = _mm512_loadu_si512(panel_quads + q / 2 * kQuadBytes + 64 * half);
        bytes = _mm512_and_si512(q % 2 == 0 ? both : _mm512_srli_epi16(both, 4), nibble);
      } else {
        bytes = _mm512_loadu_si512(panel_quads + q * kQuadBytes + 64 * half);
      }
      uint8_t* pairs = widened + q * 2 * kWidenedPairBytes + 64 * half;
      _mm512_storeu_si512(pairs, _mm512_shuffle_epi8(bytes, first));
      _mm512_storeu_si512(pairs + kWidenedPairBytes, _mm512_shuffle_epi8(bytes, second));
    }
}

// One thread's work on weight rows [n0, n0 + rows) of int8_panels' weights, slice by slice: each
// slice's exponents widened to floats, then every tile of tokens over it. Decode and small batches
// take the panels one at a time, so that they read each as one forward stream. A prefill takes
// all the block's panels (up to 8) together: a tile's activations, read into L1 once, then serve
// every panel's slice from L2. Taken a panel at a time, every tile's activations passed through L1
// for each panel, and a 2048-token prefill ran at 60% of the speed of a 128-token one.
// A bfp4 slice that more than one tile reads is split into bytes first, once; for int16 values
// every slice is widened first. The same micro-kernel calls as gemm_block's, so the same sums in
// the same order.
template <class BF>
AFM_AVX512_VNNI void gemm_panels(const Weight& w, const Int8Rows& x, float* out, int64_t n0, int64_t rows) {
  constexpr bool kNibbles = BF::mag_bits != 7;
  constexpr int64_t kSliceExponents = kDepth / kBlockFloatBlock * kPanelRows;
  const bool widen = x.int16 && x.int16_layout == Int16Layout::Values, halves = x.int16 && !widen;
  const int64_t tile_tokens = halves ? kMaxInt16Tokens : kMaxTokens, x_bytes = x.int16 ? 2 : 1;
  const bool one_tile = x.rows <= tile_tokens, split = kNibbles && !widen && !one_tile;
  const MicroFn* micro = widen                 ? kInt16ValuesMicro.data()
                         : kNibbles && !split ? (halves ? kInt16NibbleMicro : kNibbleMicro).data()
                                              : (halves ? kInt16Micro : kMicro).data();
  const int64_t N = w.rows, x_blocks = x.padded / kBlockFloatBlock;
  const int64_t group_rows = x.rows >= kPanelGroupMinTokens ? rows : kPanelRows;
  const int64_t group_panels = (group_rows + kPanelRows - 1) / kPanelRows;
  const int64_t unpacked_bytes = widen ? kDepth / 2 * kWidenedPairBytes : split ? kDepth * kPanelRows : 0;
  const __m512 bias = _mm512_set1_ps(kExponentBias<BF>);
  thread_local std::vector<float> exponents;    // [panel][kSliceExponents]
  thread_local std::vector<uint8_t> unpacked;   // [panel][unpacked_bytes]: widened or split slices
  thread_local std::vector<const uint8_t*> quads;  // each panel's slice, as the micro-kernel reads it
  exponents.resize(group_panels * kSliceExponents);
  unpacked.resize(group_panels * unpacked_bytes);
  quads.resize(group_panels);
  for (int64_t g0 = n0; g0 < n0 + rows; g0 += group_rows) {
    const int64_t panels = (std::min(group_rows, n0 + rows - g0) + kPanelRows - 1) / kPanelRows;
    for (int64_t k0 = 0; k0 < x.padded; k0 += kDepth) {
      const int64_t columns = std::min(kDepth, x.padded - k0), blocks = columns / kBlockFloatBlock;
      for (int64_t p = 0; p < panels; p++) {
        const uint8_t* panel = w.data + (g0 / kPanelRows + p) * panel_bytes<BF>(x.padded);
        const uint8_t* stored_exponents = panel + panel_bytes<BF>(k0);
        float* slice_exponents = exponents.data() + p * kSliceExponents;
        for (int64_t i = 0; i < blocks * kPanelRows; i += 16) {
          const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(stored_exponents + i));
          _mm512_storeu_ps(slice_exponents + i, _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)), bias));
        }
        if (kPrefetchNextSlice) {  // the panel's next slice, as long as this one
          const uint8_t* next = panel + panel_bytes<BF>(k0 + columns);
          // Into L1 for one tile; for more, into L2, since the tiles' activations pass through L1
          // before the next slice is read.
          for (int64_t i = 0; i < next - stored_exponents; i += 64) {
            if (one_tile) _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T0);
            else _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T1);
          }
        }
        quads[p] = stored_exponents + blocks * kPanelRows;
        uint8_t* slice_unpacked = unpacked.data() + p * unpacked_bytes;
        if (widen) widen_quads<kNibbles>(quads[p], 4 * blocks, slice_unpacked);
        if (split) split_nibbles(quads[p], 2 * blocks, slice_unpacked);
        if (widen || split) quads[p] = slice_unpacked;
      }
      for (int64_t t0 = 0; t0 < x.rows; t0 += tile_tokens) {
        const int tokens = int(std::min<int64_t>(tile_tokens, x.rows - t0));
        const XTile tile{x.q.data() + x_bytes * (t0 * x.padded + k0),
                         x.scale.data() + t0 * x_blocks + k0 / kBlockFloatBlock,
                         x.block_offset_sums.data() + t0 * x_blocks + k0 / kBlockFloatBlock, x_bytes * x.padded, x_blocks};
        for (int64_t p = 0; p < panels; p++) {
          const int64_t r0 = g0 + p * kPanelRows;
          micro[tokens - 1](tile, quads[p], exponents.data() + p * kSliceExponents, blocks, out + t0 * N + r0, N,
                            std::min(kPanelRows, N - r0), k0 > 0);
        }
      }
    }
  }
}

#pragma GCC diagnostic pop

using PackFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, uint8_t*, float*);

// One thread's work on weight rows [n0, n0 + rows): pack, multiply, slice by slice.
void gemm_block(const Weight& w, PackFn pack_panel, const Int8Rows& x, float* out, int64_t n0, int64_t rows) {
  const int64_t N = w.rows, blocks = block_float_blocks(w.cols), x_blocks = x.padded / kBlockFloatBlock;
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  thread_local std::vector<uint8_t> quads;   // [panels][kDepth / 4][32 rows][4 bytes]
  thread_local std::vector<float> exponents;  // [panels][kDepth / 16][32 rows]
  quads.resize(panels * kDepth * kPanelRows);
  exponents.resize(panels * kDepth / kBlockFloatBlock * kPanelRows);
  for (int64_t k0 = 0; k0 < x.padded; k0 += kDepth) {
    const int64_t groups = std::min(kDepth, x.padded - k0) / kInt8Group;
    uint8_t* q = quads.data();
    float* e = exponents.data();
    const int64_t quad_stride = kDepth * kPanelRows, exponent_stride = kDepth / kBlockFloatBlock * kPanelRows;
    for (int64_t p = 0; p < panels; p++)
      pack_panel(w.data + (n0 + p * kPanelRows) * w.row_bytes, w.row_bytes,
                 std::min(kPanelRows, rows - p * kPanelRows), blocks, k0, groups, q + p * quad_stride,
                 e + p * exponent_stride);
    for (int64_t t0 = 0; t0 < x.rows; t0 += kMaxTokens) {
      const int tokens = int(std::min<int64_t>(kMaxTokens, x.rows - t0));
      const XTile tile{x.q.data() + t0 * x.padded + k0, x.scale.data() + t0 * x_blocks + k0 / kBlockFloatBlock,
                       x.block_offset_sums.data() + t0 * x_blocks + k0 / kBlockFloatBlock, x.padded, x_blocks};
      for (int64_t p = 0; p < panels; p++) {
        const int64_t r0 = p * kPanelRows;
        kMicro[tokens - 1](tile, q + p * quad_stride, e + p * exponent_stride, 4 * groups, out + t0 * N + n0 + r0, N,
                           rows - r0, k0 > 0);
      }
    }
  }
}

#endif  // AFM_X86

// A matrix of `shape`'s format and size with every panel packed, panel p from the weight rows
// (a Weight of up to 32 rows) that panel_rows(p) gives, on every core. An error in any thread
// is rethrown.
template <class PanelRows>
Weight pack_panels(const Weight& shape, const PanelRows& panel_rows) {
#ifdef AFM_X86
  const bool bfp8 = shape.format == WeightFormat::BFP8;
  const int64_t padded = std::max<int64_t>(kInt8Group, round_up(shape.cols, kInt8Group));
  const int64_t per_panel = bfp8 ? panel_bytes<Bfp8>(padded) : panel_bytes<Bfp4>(padded);
  const int64_t panels = (shape.rows + kPanelRows - 1) / kPanelRows, bytes = panels * per_panel;
  std::shared_ptr<uint8_t[]> buffer = allocate_streamed(bytes);
  parallel_for(panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++)
      (bfp8 ? pack_whole_panel<Bfp8> : pack_whole_panel<Bfp4>)(panel_rows(p), padded, buffer.get() + p * per_panel);
  });
  Weight packed = shape;
  packed.data = buffer.get();
  packed.row_bytes = per_panel / kPanelRows;  // a row's share of its panel
  packed.layout = WeightLayout::Backend;
  packed.file_mapped = false;
  packed.owner = std::move(buffer);
  return packed;
#else
  (void)panel_rows;
  return shape;  // never called: int8_gemm_supported is false off x86
#endif
}

int64_t panel_row_count(const Weight& w, int64_t p) { return std::min(kPanelRows, w.rows - p * kPanelRows); }

void require_kernels(Isa isa, const char* what) {
  if (!int8_gemm_supported(isa)) throw Error(std::string(what) + ": no kernels for " + isa_name(isa) + " on this CPU");
}

}  // namespace

bool int8_gemm_supported(Isa isa) {
#ifdef AFM_X86
  return isa == Isa::Avx512Vnni && isa_supported(isa);
#else
  (void)isa;
  return false;
#endif
}

Int16Layout int16_layout_for(int64_t tokens) {
  return tokens >= kInt16ValuesMinTokens ? Int16Layout::Values : Int16Layout::Halves;
}

void int8_gemm(const Weight& w, const Int8Rows& x, float* out, ThreadPool& pool, Isa isa) {
  require_kernels(isa, "int8 gemm");
  if (!is_block_float(w.format)) throw Error("int8 gemm: only for bfp8 and bfp4 weights, not " + format_name(w.format));
  if (x.k != w.cols) throw Error("int8 gemm: activations have " + std::to_string(x.k) + " columns, weights " +
                                 std::to_string(w.cols));
  if (x.format != w.format)
    throw Error("int8 gemm: activations quantized for " + format_name(x.format) + " weights, not " + format_name(w.format));
  if (x.int16 && w.layout != WeightLayout::Backend)
    throw Error("int8 gemm: int16 activations need weights packed by int8_panels");
  if (w.rows == 0 || x.rows == 0) return;
#ifdef AFM_X86
  if (w.layout == WeightLayout::Backend) {
    for_each_row_block(pool, w.rows, kPanelRows, kBlockRows, x.rows * w.rows * w.cols, [&](int64_t n0, int64_t rows) {
      if (w.format == WeightFormat::BFP8) gemm_panels<Bfp8>(w, x, out, n0, rows);
      else gemm_panels<Bfp4>(w, x, out, n0, rows);
    });
    return;
  }
  const PackFn pack_panel = w.format == WeightFormat::BFP8 ? pack<Bfp8> : pack<Bfp4>;
  for_each_row_block(pool, w.rows, kPanelRows, kBlockRows, x.rows * w.rows * w.cols,
                     [&](int64_t n0, int64_t rows) { gemm_block(w, pack_panel, x, out, n0, rows); });
#else
  (void)out;
  (void)pool;
#endif
}

Weight int8_panels(const Weight& w, Isa isa) {
  require_kernels(isa, "int8 panels");
  if (!is_block_float(w.format) || w.layout != WeightLayout::Rows)
    throw Error("int8 panels: only for bfp8 and bfp4 weights laid out as rows, not " + format_name(w.format));
  Weight packed = pack_panels(w, [&](int64_t p) {
    Weight rows = w;
    rows.data = w.data + p * kPanelRows * w.row_bytes;
    rows.rows = panel_row_count(w, p);
    return rows;
  });
  if (w.file_mapped) release_file_pages(w.data, w.bytes());
  return packed;
}

Weight int8_panels(const TensorView& view, WeightFormat format, MatmulInputs inputs, Isa isa) {
  require_kernels(isa, "int8 panels");
  if (!is_block_float(format) || view.shape.size() != 2)
    throw Error("int8 panels: only bfp8 and bfp4 matrices, not " + format_name(format) + " for " + view.describe());
  Weight shape;
  shape.format = format;
  shape.rows = view.shape[0];
  shape.cols = view.shape[1];
  shape.row_bytes = block_float_row_bytes(format, shape.cols);
  shape.inputs = inputs;
  // Each panel's rows are converted into a buffer that stays in cache and packed from there: the
  // converted matrix is never held, so load touches fresh memory once, for the panels.
  Weight packed = pack_panels(shape, [&](int64_t p) {
    thread_local std::vector<uint8_t> converted;
    thread_local std::vector<float> scratch;
    Weight rows = shape;
    rows.rows = panel_row_count(shape, p);
    converted.resize(rows.rows * rows.row_bytes);
    scratch.resize(shape.cols);
    for (int64_t r = 0; r < rows.rows; r++)
      convert_row(view, p * kPanelRows + r, format, scratch.data(), converted.data() + r * rows.row_bytes);
    rows.data = converted.data();
    return rows;
  });
  if (view.file_mapped) release_file_pages(view.data, view.nbytes);
  return packed;
}

}  // namespace afm::cpu
