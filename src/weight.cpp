#include "weight.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "blockfloat.h"
#include "error.h"
#include "numeric.h"
#include "parallel_for.h"

namespace afm {

std::string format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32: return "f32";
    case WeightFormat::F16: return "f16";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::BFP8: return "bfp8";
    case WeightFormat::BFP4: return "bfp4";
  }
  return "?";
}

WeightFormat parse_weight_format(const std::string& name) {
  for (WeightFormat f : kSelectableFormats)
    if (name == format_name(f)) return f;
  throw Error("unknown weight format \"" + name + "\" (choose f32, bf16, bfp8 or bfp4)");
}

// The weight format a tensor is used in as stored; none for ggml's block types, which are
// converted at load.
static std::optional<WeightFormat> stored_format(const TensorView& view) {
  switch (view.dtype) {
    case DType::F32: return WeightFormat::F32;
    case DType::F16: return WeightFormat::F16;
    case DType::BF16: return WeightFormat::BF16;
    case DType::BFP8: return WeightFormat::BFP8;
    case DType::BFP4: return WeightFormat::BFP4;
    case DType::I64: case DType::I32: throw Error(view.describe() + ": weights must be floating-point");
    default: return std::nullopt;
  }
}

static int64_t row_bytes(WeightFormat format, int64_t cols) {
  switch (format) {
    case WeightFormat::F32: return 4 * cols;
    case WeightFormat::F16: case WeightFormat::BF16: return 2 * cols;
    case WeightFormat::BFP8: case WeightFormat::BFP4: return block_float_row_bytes(format, cols);
  }
  return 0;
}

void dequantize_row(const Weight& w, int64_t row, float* dst) {
  if (w.layout != WeightLayout::Rows) throw Error("dequantize_row: the weight is laid out for its backend's kernels");
  const uint8_t* src = w.data + row * w.row_bytes;
  switch (w.format) {
    case WeightFormat::F32: floats_to_f32(DType::F32, src, w.cols, dst); break;
    case WeightFormat::F16: floats_to_f32(DType::F16, src, w.cols, dst); break;
    case WeightFormat::BF16: floats_to_f32(DType::BF16, src, w.cols, dst); break;
    case WeightFormat::BFP8: case WeightFormat::BFP4: block_float_dequantize_row(w.format, src, w.cols, dst); break;
  }
}

// The file's own format when `target` can use it as it is (f32 compute needs no conversion: bf16
// and f16 widen to f32 exactly inside the kernels); nullopt when make_weight converts.
static std::optional<WeightFormat> mapped_format(const TensorView& view, WeightFormat target) {
  const std::optional<WeightFormat> source = stored_format(view);
  if (source && (target == WeightFormat::F32 || target == *source)) return source;
  return std::nullopt;
}

int64_t weight_bytes(const TensorView& view, WeightFormat target) {
  if (view.shape.empty() || view.shape.size() > 2) return view.nbytes;
  const int64_t rows = view.shape.size() == 2 ? view.shape[0] : 1;
  return rows * row_bytes(mapped_format(view, target).value_or(target), view.shape.back());
}

void release_file_pages(const void* data, int64_t bytes) {
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (uintptr_t(data) + page - 1) / page * page;
  const uintptr_t end = (uintptr_t(data) + uintptr_t(bytes)) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

std::shared_ptr<uint8_t[]> allocate_streamed(int64_t bytes) {
  constexpr int64_t kHugePage = int64_t(2) << 20, kVector = 64;
  const int64_t align = bytes >= kHugePage ? kHugePage : kVector;
  const int64_t size = (std::max<int64_t>(bytes, 1) + align - 1) / align * align;
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(size_t(align), size_t(size)));
  if (!p) throw Error("out of memory for a buffer of " + std::to_string(bytes) + " bytes");
  // Advice only: where transparent huge pages are off this is a no-op.
  if (align == kHugePage) madvise(p, size_t(size), MADV_HUGEPAGE);
  return std::shared_ptr<uint8_t[]>(p, std::free);
}

bool converts_at_load(const TensorView& view, WeightFormat target) { return !mapped_format(view, target); }

void convert_row(const TensorView& view, int64_t row, WeightFormat target, float* scratch, uint8_t* dst) {
  const int64_t cols = view.shape.back();
  floats_to_f32(view.dtype, view.data + row * dtype_row_bytes(view.dtype, cols), cols, scratch);
  if (target == WeightFormat::F32) {
    std::memcpy(dst, scratch, 4 * cols);
  } else if (target == WeightFormat::BF16) {
    for (int64_t c = 0; c < cols; c++) {
      const uint16_t h = f32_to_bf16(scratch[c]);
      std::memcpy(dst + 2 * c, &h, 2);
    }
  } else {
    block_float_quantize_row(target, scratch, cols, dst);
  }
}

Weight make_weight(const TensorView& view, WeightFormat target) {
  if (view.shape.empty() || view.shape.size() > 2) throw Error(view.describe() + ": expected a vector or a matrix");
  Weight w;
  w.rows = view.shape.size() == 2 ? view.shape[0] : 1;
  w.cols = view.shape.back();
  const std::optional<WeightFormat> source = mapped_format(view, target);
  w.inputs = target == WeightFormat::F32 ? MatmulInputs::F32 : MatmulInputs::BF16;

  if (source) {
    w.format = *source;
    w.row_bytes = row_bytes(*source, w.cols);
    w.data = view.data;
    w.file_mapped = view.file_mapped;
    w.owner = view.owner;
    return w;
  }
  // Block-quantized rows are dequantized (exactly as ggml or blockfloat.h do) and then stored in
  // the target.
  w.format = target;
  w.row_bytes = row_bytes(target, w.cols);
  // Plain pages, not allocate_streamed's: converted rows are read by kernels bound by
  // instructions, and huge pages made this load up to 1.6x slower (the kernel finds and zeroes
  // 2 MiB at a time).
  auto buffer = std::shared_ptr<uint8_t[]>(new uint8_t[w.rows * w.row_bytes]);
  // Rows convert independently; a 4.6B-parameter model is worth every core at load. An error in
  // any thread (a non-finite weight) is rethrown here.
  parallel_for(w.rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(w.cols);
    for (int64_t r = begin; r < end; r++) convert_row(view, r, target, scratch.data(), buffer.get() + r * w.row_bytes);
  });
  if (view.file_mapped) release_file_pages(view.data, view.nbytes);
  w.data = buffer.get();
  w.owner = buffer;
  return w;
}

}  // namespace afm
