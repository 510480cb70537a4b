// Integer dot products for the block-float formats: the activation row is quantized once per
// matmul to int8 in blocks of 16 (one f32 scale per block, the blocks of the weight rows), and
// each block's 16 products are summed in integers by the CPU's int8 dot instructions (AVX-512
// VNNI `vpdpbusd`, AVX2 `vpmaddubsw`+`vpmaddwd`), then scaled once by x's scale times the
// weight block's 2^exponent. Decoding a bfp8 weight then costs one byte operation instead of a
// widening, a conversion and a multiply, which is what keeps decode at the memory-bandwidth floor.
// The numerics differ from the f32 kernels only by the rounding of x to int8 (at most half a
// step of max|block| / 127 per value); docs/ACCURACY.md measures what that does to a model.
#pragma once
#include <cstdint>
#include <vector>

#include "backends/cpu/dot.h"
#include "backends/cpu/thread_pool.h"
#include "weight.h"

namespace afm::cpu {

constexpr int64_t kInt8Group = 64;  // int8 values in one 512-bit vector: 4 blocks

// Rows of activations quantized for one weight format's int8 kernels. Per row of k values,
// padded with zeros to `padded` (a multiple of kInt8Group):
//   q[i]         round(x[i] / scale[i / 16]), in -127..127, with scale = max |x| of the block / 127;
//   scale[b]     0 for a block of zeros (or of values all below 2^-100), NaN for a block holding
//                a NaN or an infinity (its q are 0), so that products with it are NaN as in f32;
//   offset_sums  -(offset * (q[4j] + ... + q[4j+3])) per 4 values: the kernels that read a weight
//                as an unsigned byte (its value + offset; offset 128 for bfp8, 8 for bfp4) start
//                their integer sums from it, which cancels the offset exactly;
//   block_offset_sums  the same per block of 16 (the GEMM's, int8_gemm.h).
//
// Rows quantized by quantize_int16_rows instead (int16) hold 16-bit values in
// -kInt16Max..kInt16Max with scale = max |x| / kInt16Max, laid out as Int16Layout says;
// offset_sums is empty and block_offset_sums cancels the offset of the whole 16-bit sums.
enum class Int16Layout {
  // Each value split into two int8 halves, so that `vpdpbusd` sums them against the packed int8
  // weights as they are: per block of 16, 16 high bytes then 16 low bytes, the value being
  // 256 high + low (low in -128..127). For a few tokens, which read the weights once.
  Halves,
  // The values themselves, 2 bytes each, for `vpdpwssd` on weights widened to int16 once per
  // slice of a panel: one instruction per 32 multiply-adds and no halves to recombine, which
  // repays the widening when many tokens share each slice (a prefill).
  Values,
};

struct Int8Rows {
  WeightFormat format = WeightFormat::BFP8;  // the weights whose offset offset_sums cancel
  int64_t rows = 0, k = 0, padded = 0;
  bool int16 = false;
  Int16Layout int16_layout = Int16Layout::Halves;
  std::vector<int8_t> q;          // [rows][padded], int16: [rows][2 padded]
  std::vector<float> scale;       // [rows][padded / 16]
  std::vector<int32_t> offset_sums;  // [rows][padded / 4]
  std::vector<int32_t> block_offset_sums;  // [rows][padded / 16]
};

// Quantizes `rows` rows of x (row stride k) for the int8 kernels of `format` (BFP8 or BFP4),
// over `pool` when given (rows are independent), with `isa`'s kernel (every ISA's gives the same
// bytes).
void quantize_int8_rows(WeightFormat format, const float* x, int64_t rows, int64_t k, Int8Rows& out,
                        ThreadPool* pool = nullptr, Isa isa = best_isa());

// The largest int16 value: the high half of 256 high + low (low >= -128) stays within int8.
constexpr int32_t kInt16Max = 127 * 256 + 127;

// As quantize_int8_rows, to 16-bit values (Int8Rows::int16) laid out as `layout`: a rounding
// error 256x smaller, for twice the integer work. Only the int8 GEMM over packed panels reads them.
void quantize_int16_rows(WeightFormat format, const float* x, int64_t rows, int64_t k, Int8Rows& out,
                         ThreadPool* pool = nullptr, Int16Layout layout = Int16Layout::Halves, Isa isa = best_isa());

// out[j] = sum over blocks of W(w_row) · (q * scale) of rows first..first + n_x - 1 of x
// (n_x in 1..kMaxDotRows), x quantized by quantize_int8_rows (the dot kernels have no int16);
// k is the weight row's column count, equal to x.k.
using Int8DotFn = void (*)(const uint8_t* w_row, const Int8Rows& x, int64_t first, int n_x, float* out);

// Throws afm::Error for a format other than BFP8 / BFP4, or an ISA this CPU lacks. Avx512 without
// VNNI runs the AVX2 kernels.
Int8DotFn int8_dot_kernel(WeightFormat format, Isa isa = best_isa());

}  // namespace afm::cpu
