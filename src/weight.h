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

// What a matmul rounds its activations to before multiplying (accumulation is f32 throughout):
// nothing (f32 weights, exact), bf16 (the bring-up note's kernels, which read activations in
// bf16), or, with block-float weights, int8 per block of 16 with an f32 scale (the int8 dot
// kernels and GEMM, backends/cpu/int8_dot.h; a prefill reads bf16 where the CPU lacks the GEMM),
// or int16 the same way (two int8 halves for the int8 GEMM, where the CPU has it; bf16 elsewhere).
enum class MatmulInputs { F32, BF16, Int8, Int16 };

// How a weight's bytes are laid out: as rows (below), or as the backend's upload laid them out for
// its own kernels (backend.h), which only that backend reads.
enum class WeightLayout { Rows, Backend };

struct Weight {
  WeightFormat format = WeightFormat::F32;
  int64_t rows = 0, cols = 0;
  const uint8_t* data = nullptr;            // Rows: row r starts at data + r * row_bytes
  int64_t row_bytes = 0;                    // Backend: bytes() / rows, for the bytes a matmul reads
  MatmulInputs inputs = MatmulInputs::F32;
  WeightLayout layout = WeightLayout::Rows;
  bool file_mapped = false;                 // data points into a memory-mapped checkpoint
  std::shared_ptr<const void> owner;        // keeps the mapping or the converted buffer alive

  int64_t bytes() const { return rows * row_bytes; }
};

// Drops the pages of a mapped file's range from this process (they stay in the page cache): once
// a tensor is converted, so that loading peaks near the converted model's size.
void release_file_pages(const void* data, int64_t bytes);

// Uninitialized memory for a big buffer that kernels stream (packed weights, the bandwidth
// probe). From 2 MiB up it is 2 MiB-aligned and advised for transparent huge pages: a
// stream then takes a TLB entry per 2 MiB, not per 4 KiB (a miss on a VM is a two-level page walk),
// which took the int8 decode matmul from about 60% to 78% of the read bandwidth. Throws
// afm::Error when there is no memory.
std::shared_ptr<uint8_t[]> allocate_streamed(int64_t bytes);

// Prepare a checkpoint tensor for the kernels. F32 keeps the file's dtype (bf16 and f16 widen to
// f32 exactly in the kernels) and so does a target equal to it: both point into the mapping.
// Other targets convert at load. Every target but F32 reads its inputs as bf16.
Weight make_weight(const TensorView& view, WeightFormat target);

// Whether make_weight(view, target) converts (rather than pointing into the file's bytes).
bool converts_at_load(const TensorView& view, WeightFormat target);

// Row `row` of the matrix `view` converted to `target` as make_weight converts it, into dst
// (target's row bytes); scratch holds a row of floats. Throws afm::Error for a non-finite value
// where the target is block-float.
void convert_row(const TensorView& view, int64_t row, WeightFormat target, float* scratch, uint8_t* dst);

// The bytes make_weight(view, target) holds: the file's own bytes where it maps them, else the
// converted rows. What a memory budget counts before loading.
int64_t weight_bytes(const TensorView& view, WeightFormat target);

// Row `row` of w as f32 values (embedding lookups, norm weights, tests); w's layout is Rows.
void dequantize_row(const Weight& w, int64_t row, float* dst);

}  // namespace afm
