// Dot products of one weight row with up to 4 f32 activation rows: the inner loop of `linear`,
// out[t][n] = dot(x[t], W[n]), for every weight format. Taking several activation rows at once
// lets a prefill decode each weight chunk once for up to 4 tokens; decode calls it with n_x = 1,
// where it streams the weight row and is bound by memory bandwidth.
// Weights are decoded exactly to f32 and accumulated in f32.
#pragma once
#include <cstdint>

#include "weight.h"

namespace afm::cpu {

// Kernel variants. Each is compiled without -march flags (per-function target attributes) and
// picked at run time, so one binary runs everywhere and uses the widest SIMD the CPU has.
// Avx2 also requires FMA and F16C; Avx512 is F + BW + VL + DQ on top of those; Avx512Vnni adds
// the int8 dot-product instruction (Cascade Lake, Ice Lake, Zen 4 and later), which the int8
// kernels use (int8_dot.h); its f32 kernels are Avx512's.
enum class Isa { Scalar, Avx2, Avx512, Avx512Vnni };
inline constexpr Isa kAllIsas[] = {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni};

bool isa_supported(Isa isa);  // on this CPU
const char* isa_name(Isa isa);  // "scalar", "avx2", "avx512", "avx512vnni"

// The ISA named by `requested` (an isa_name), or the widest supported one when it
// is null or empty. Throws afm::Error for another name or one this CPU lacks.
Isa choose_isa(const char* requested);
// choose_isa(getenv("AFM_ISA")), read once: AFM_ISA=avx2 forces a narrower path for A/B
// benchmarks and tests on a machine that has a wider one.
Isa best_isa();

constexpr int kMaxDotRows = 4;

// out[j] = sum_{i<k} W(w_row, i) * x[j * x_stride + i] for j < n_x (1..kMaxDotRows).
// w_row is one row of a Weight in `format` (any alignment); k is the row's column count.
using DotFn = void (*)(const uint8_t* w_row, const float* x, int64_t x_stride, int n_x, int64_t k,
                       float* out);

// Throws afm::Error when `isa` is not supported on this CPU.
DotFn dot_kernel(WeightFormat format, Isa isa = best_isa());

// dst[i] = W(w_row, begin + i) for i < count, exactly: weights begin..begin+count-1 of a row of k
// (begin a multiple of 16), decoded to f32 for the matmul kernels' packed panels.
using DecodeFn = void (*)(const uint8_t* w_row, int64_t k, int64_t begin, int64_t count, float* dst);
DecodeFn decode_kernel(WeightFormat format, Isa isa = best_isa());

}  // namespace afm::cpu
