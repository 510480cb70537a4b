// ggml's block-quantized types, dequantized bit for bit as ggml's C code and gguf-py's numpy
// `dequantize` do (same operations in the same order, in f32).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace afm {

// n values (a multiple of dtype_block(type).values) from whole blocks at src.
void dequantize_ggml(DType type, const uint8_t* src, int64_t n, float* dst);

}  // namespace afm
