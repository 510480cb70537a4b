#include "ggml_quants.h"

#include <string>

#include "error.h"

namespace afm {

void dequantize_ggml(DType type, const uint8_t* src, int64_t n, float* dst) {
  throw Error(std::string("dequantizing ") + dtype_name(type) + " is not implemented yet");
}

}  // namespace afm
