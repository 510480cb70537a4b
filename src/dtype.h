// Element types of stored tensors: safetensors' plain types, the block-quantized types of ggml
// (GGUF files), and afm's own packed block-float rows (`afm convert`). A block type packs
// `values` numbers into `bytes` bytes with shared scales.
#pragma once
#include <cstdint>

namespace afm {

enum class DType { F32, F16, BF16, I64, I32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BFP8, BFP4 };

const char* dtype_name(DType dtype);  // "F32", "Q4_K", "AFM_BFP8" (as safetensors headers spell it), ...

struct BlockLayout {
  int64_t values = 1, bytes = 0;  // {1, 4} for F32, {32, 34} for Q8_0, {256, 210} for Q6_K
};
BlockLayout dtype_block(DType dtype);
bool is_floating(DType dtype);  // every type but the integer ones

// Bytes of one row of `cols` values: whole blocks, a partial last one padded (afm's block-float
// rows; ggml's rows are whole blocks, which the GGUF reader checks).
int64_t dtype_row_bytes(DType dtype, int64_t cols);

// Widen n values of a floating type to f32: exact for F16 and BF16, ggml's own dequantization for
// its block types (then n is a multiple of the block and src starts at a block); for BFP8 and
// BFP4, src is one packed row of n values (blockfloat.h).
void floats_to_f32(DType dtype, const uint8_t* src, int64_t n, float* dst);

}  // namespace afm
