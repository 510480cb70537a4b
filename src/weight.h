// A weight matrix as the kernels consume it: [rows, cols] row-major, in one of the storage formats.
// F32/F16/BF16 may point straight into a memory-mapped checkpoint; converted formats own their bytes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "safetensors.h"

namespace afm {

enum class WeightFormat { F32, F16, BF16, BFP8, BFP4 };

// The formats a user can choose with --weights (f16 is only ever a checkpoint's own dtype).
inline constexpr WeightFormat kSelectableFormats[] = {WeightFormat::F32, WeightFormat::BF16, WeightFormat::BFP8,
                                                      WeightFormat::BFP4};

std::string format_name(WeightFormat format);
WeightFormat parse_weight_format(const std::string& name);  // "f32", "bf16", "bfp8", "bfp4"; throws afm::Error

struct Weight {
  WeightFormat format = WeightFormat::F32;
  int64_t rows = 0, cols = 0;
  const uint8_t* data = nullptr;            // row r starts at data + r * row_bytes
  int64_t row_bytes = 0;
  // Reduced-precision formats model the bring-up note's kernels, which read their activations in
  // bf16: the matmul rounds its input to bf16 and accumulates in f32.
  bool bf16_inputs = false;
  std::shared_ptr<const void> owner;        // keeps the mapping or the converted buffer alive

  int64_t bytes() const { return rows * row_bytes; }
};

// Prepare a checkpoint tensor for the kernels. F32 keeps the file's dtype (bf16 and f16 widen to
// f32 exactly in the kernels) and so does a target equal to it: both point into the mapping.
// Other targets convert at load. Every target but F32 sets bf16_inputs.
Weight make_weight(const TensorView& view, WeightFormat target);

// Row `row` of w as f32 values (embedding lookups, norm weights, tests).
void dequantize_row(const Weight& w, int64_t row, float* dst);

}  // namespace afm
