#include "dtype.h"

#include <cstring>
#include <string>

#include "blockfloat.h"
#include "error.h"
#include "ggml_quants.h"
#include "multiversion.h"
#include "numeric.h"

namespace afm {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::Q4_0: return "Q4_0";
    case DType::Q4_1: return "Q4_1";
    case DType::Q5_0: return "Q5_0";
    case DType::Q5_1: return "Q5_1";
    case DType::Q8_0: return "Q8_0";
    case DType::Q2_K: return "Q2_K";
    case DType::Q3_K: return "Q3_K";
    case DType::Q4_K: return "Q4_K";
    case DType::Q5_K: return "Q5_K";
    case DType::Q6_K: return "Q6_K";
    case DType::BFP8: return "AFM_BFP8";
    case DType::BFP4: return "AFM_BFP4";
  }
  return "?";
}

// ggml's block sizes (ggml-common.h): 32 values per legacy block, 256 per k-quant super-block.
BlockLayout dtype_block(DType dtype) {
  switch (dtype) {
    case DType::F32: case DType::I32: return {1, 4};
    case DType::F16: case DType::BF16: return {1, 2};
    case DType::I64: return {1, 8};
    case DType::Q4_0: return {32, 18};
    case DType::Q4_1: return {32, 20};
    case DType::Q5_0: return {32, 22};
    case DType::Q5_1: return {32, 24};
    case DType::Q8_0: return {32, 34};
    case DType::Q2_K: return {256, 84};
    case DType::Q3_K: return {256, 110};
    case DType::Q4_K: return {256, 144};
    case DType::Q5_K: return {256, 176};
    case DType::Q6_K: return {256, 210};
    case DType::BFP8: return {16, 17};  // its exponent byte and 16 int8 magnitudes
    case DType::BFP4: return {16, 9};
  }
  return {};
}

int64_t dtype_row_bytes(DType dtype, int64_t cols) {
  const BlockLayout block = dtype_block(dtype);
  return (cols + block.values - 1) / block.values * block.bytes;
}

bool is_floating(DType dtype) { return dtype != DType::I64 && dtype != DType::I32; }

AFM_VECTORIZED_CLONES void floats_to_f32(DType dtype, const uint8_t* src, int64_t n, float* dst) {
  uint16_t h;
  switch (dtype) {
    case DType::F32: std::memcpy(dst, src, size_t(n) * 4); return;
    case DType::BF16: for (int64_t i = 0; i < n; i++) std::memcpy(&h, src + 2 * i, 2), dst[i] = bf16_to_f32(h); return;
    case DType::F16: for (int64_t i = 0; i < n; i++) std::memcpy(&h, src + 2 * i, 2), dst[i] = f16_to_f32(h); return;
    case DType::I64: case DType::I32:
      throw Error(std::string("expected a floating-point dtype, got ") + dtype_name(dtype));
    case DType::BFP8: block_float_dequantize_row(WeightFormat::BFP8, src, n, dst); return;
    case DType::BFP4: block_float_dequantize_row(WeightFormat::BFP4, src, n, dst); return;
    default: dequantize_ggml(dtype, src, n, dst); return;
  }
}

}  // namespace afm
