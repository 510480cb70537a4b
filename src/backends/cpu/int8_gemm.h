// The prefill and batched matmul for block-float weights with int8 activations
// (`--activations int8`): gemm.h's scheme on AVX-512 VNNI's `vpdpbusd`, which does 64
// multiply-adds per instruction where an f32 FMA does 16. A thread's block of weight rows is
// packed slice by slice into panels that stay in cache: the weights' bytes as they are stored
// (plus the unsigned offset, int8_weights.h) laid out [4 columns][32 rows], so no weight is
// ever decoded to f32; every tile of tokens then runs over every panel.
#pragma once
#include <cstdint>

#include "backends/cpu/dot.h"
#include "backends/cpu/int8_dot.h"
#include "backends/cpu/thread_pool.h"
#include "weight.h"

namespace afm::cpu {

// Whether int8_gemm has kernels for `isa` on this CPU (AVX-512 VNNI; other ISAs take the f32 GEMM).
bool int8_gemm_supported(Isa isa);

// out (x.rows rows of w.rows floats) = x @ w^T for BFP8 / BFP4 weights and x quantized by
// quantize_int8_rows: per block, the integer sum of the products, times x's block scale and the
// weight block's 2^exponent, summed in f32. The int8 dot kernels' numerics, summed in another
// order. Throws afm::Error for another format or when !int8_gemm_supported(isa).
// Weights laid out by int8_panels (WeightLayout::Backend) take the same products, for any number
// of tokens, from panels packed at load; they alone also take x from quantize_int16_rows (each
// 16-bit value as its two int8 halves' sums), which rows refuse.
void int8_gemm(const Weight& w, const Int8Rows& x, float* out, ThreadPool& pool, Isa isa = best_isa());

// The int16 layout in which int8_gemm multiplies `tokens` tokens fastest: halves for a few (a
// decode step, a small batch), values for more (a prefill).
Int16Layout int16_layout_for(int64_t tokens);

// bfp8 / bfp4 rows re-laid out, once, as every panel int8_gemm would pack, in one buffer (the
// rows' file pages released when mapped): a matmul then streams its weights in order and packs
// nothing. The same bytes per weight as the rows: bfp4 keeps two weights per byte, and its
// micro-kernel splits them. Packs on every core. Throws afm::Error for another format or layout,
// or when !int8_gemm_supported(isa).
Weight int8_panels(const Weight& w, Isa isa = best_isa());

// The same panels straight from a checkpoint matrix of any floating-point dtype, converted to
// `format` (bfp8 / bfp4) as make_weight converts it but a panel's rows at a time, for matmuls on
// `inputs` (int8 or int16). Throws afm::Error as make_weight does, or as above.
Weight int8_panels(const TensorView& view, WeightFormat format, MatmulInputs inputs, Isa isa = best_isa());

}  // namespace afm::cpu
