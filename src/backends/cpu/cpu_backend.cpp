// The CPU backend: the op set in plain loops, parallel over output rows or heads on a thread
// pool, with the inner dot products in runtime-dispatched SIMD kernels (dot.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend.h"
#include "backends/cpu/attention.h"
#include "backends/cpu/dot.h"
#include "backends/cpu/gemm.h"
#include "backends/cpu/int8_dot.h"
#include "backends/cpu/int8_gemm.h"
#include "backends/cpu/thread_pool.h"
#include "blockfloat.h"
#include "error.h"
#include "multiversion.h"
#include "numeric.h"

namespace afm {

namespace {

// The element-wise ops over [begin, end), compiled for each vector ISA (multiversion.h).
AFM_VECTORIZED_CLONES void add_range(float* x, const float* y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i++) x[i] += y[i];
}

// max(x, 0)^2, NaN kept. Written without std::max, which GCC compiled to a branch instead of a
// vector loop (random signs mispredicted: 4.6% of a 512-token prefill).
AFM_VECTORIZED_CLONES void relu_squared_range(float* x, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i++) {
    const float r = x[i] < 0.0f ? 0.0f : x[i];
    x[i] = r * r;
  }
}

AFM_VECTORIZED_CLONES void silu_mul_range(float* gate, const float* up, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i++) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : pool_(num_threads) {}

  Device device() const override { return Device::cpu(); }

  Tensor tensor(int64_t rows, int64_t cols) override {
    Tensor t;
    t.rows = rows;
    t.cols = cols;
    t.storage = std::shared_ptr<float[]>(new float[std::max<int64_t>(rows * cols, 1)]);
    t.data = t.storage.get();
    return t;
  }

  // Block-float weights for int8 or int16 activations are packed for the int8 GEMM once, at
  // load, where the CPU has it: every matmul then streams its panels, whatever the tokens (decode
  // included), and packs nothing.
  static bool packs_panels(WeightFormat format, MatmulInputs inputs) {
    const bool integer_inputs = inputs == MatmulInputs::Int8 || inputs == MatmulInputs::Int16;
    return is_block_float(format) && integer_inputs && cpu::int8_gemm_supported(cpu::best_isa());
  }

  Weight upload(Weight w) override {
    return packs_panels(w.format, w.inputs) && w.layout == WeightLayout::Rows ? cpu::int8_panels(w) : w;
  }

  // A matrix converted at load goes straight into panels, a few rows at a time: the converted
  // rows are never held, which halves the fresh memory a load touches.
  Weight load_matrix(const TensorView& view, WeightFormat format, MatmulInputs inputs) override {
    if (packs_panels(format, inputs) && converts_at_load(view, format)) return cpu::int8_panels(view, format, inputs);
    return Backend::load_matrix(view, format, inputs);
  }

  void embedding(const Weight& table, std::span<const int32_t> ids, Tensor& out) override {
    for (size_t t = 0; t < ids.size(); t++) {
      if (ids[t] < 0 || ids[t] >= table.rows)
        throw Error("token id " + std::to_string(ids[t]) + " is outside the vocabulary (" +
                    std::to_string(table.rows) + ")");
      dequantize_row(table, ids[t], out.row(t));
    }
  }

  void rms_norm(const Tensor& x, const Weight& weight, float eps, Tensor& out) override {
    std::vector<float> gamma(weight.cols);
    dequantize_row(weight, 0, gamma.data());
    by_rows(x.rows, x.cols, [&](int64_t t) {
      const float* in = x.row(t);
      double sum_squares = 0;
      for (int64_t c = 0; c < x.cols; c++) sum_squares += double(in[c]) * in[c];
      const float scale = 1.0f / std::sqrt(float(sum_squares / double(x.cols)) + eps);
      float* o = out.row(t);
      for (int64_t c = 0; c < x.cols; c++) o[c] = gamma[c] * (in[c] * scale);
    });
  }

  void linear(const Tensor& x_in, const Weight& w, Tensor& out) override {
    const int64_t T = x_in.rows, K = w.cols;
    const bool gemm = T >= cpu::kGemmMinTokens && cpu::gemm_supported(cpu::best_isa());
    // Weights that upload packed take the int8 GEMM for any number of tokens.
    const bool int8_gemm = w.layout == WeightLayout::Backend || (gemm && cpu::int8_gemm_supported(cpu::best_isa()));
    // Int16 inputs take the int8 GEMM on packed weights; elsewhere they read bf16.
    if (w.inputs == MatmulInputs::Int16 && w.layout == WeightLayout::Backend) {
      cpu::quantize_int16_rows(w.format, x_in.data, T, K, int8_rows_, &pool_, cpu::int16_layout_for(T));
      return cpu::int8_gemm(w, int8_rows_, out.data, pool_);
    }
    // Int8 inputs take the int8 kernels, but for a prefill on a CPU without the int8 GEMM, which
    // takes the f32 GEMM on bf16 inputs.
    if (w.inputs == MatmulInputs::Int8 && (int8_gemm || !gemm)) {
      cpu::quantize_int8_rows(w.format, x_in.data, T, K, int8_rows_, &pool_);
      if (int8_gemm) return cpu::int8_gemm(w, int8_rows_, out.data, pool_);
      const cpu::Int8DotFn dot = cpu::int8_dot_kernel(w.format);
      return rows_by_groups_of_tokens(w, T, out, [&](const uint8_t* w_row, int64_t t0, int nt, float* result) {
        dot(w_row, int8_rows_, t0, nt, result);
      });
    }
    const Tensor x = w.inputs == MatmulInputs::F32 ? x_in : rounded_to_bf16(x_in);
    if (gemm) return cpu::gemm(w, x.data, T, out.data, pool_);
    const cpu::DotFn dot = cpu::dot_kernel(w.format);
    rows_by_groups_of_tokens(w, T, out, [&](const uint8_t* w_row, int64_t t0, int nt, float* result) {
      dot(w_row, x.row(t0), K, nt, K, result);
    });
  }

  // out[t][n] = dot(w row n, token t) for groups of up to kMaxDotRows tokens, spread over the
  // pool by blocks of weight rows, which stay in cache while every group passes over them.
  template <class Dot>
  void rows_by_groups_of_tokens(const Weight& w, int64_t T, Tensor& out, const Dot& dot) {
    constexpr int64_t kRowBlock = 16, kTokens = cpu::kMaxDotRows;
    pool_.parallel_for(w.rows, kRowBlock, T * w.rows * w.cols, [&](int64_t n0, int64_t n1) {
      float result[kTokens];
      for (int64_t t0 = 0; t0 < T; t0 += kTokens) {
        const int nt = int(std::min(kTokens, T - t0));
        for (int64_t n = n0; n < n1; n++) {
          dot(w.data + n * w.row_bytes, t0, nt, result);
          for (int j = 0; j < nt; j++) out.row(t0 + j)[n] = result[j];
        }
      }
    });
  }

  Tensor rounded_to_bf16(const Tensor& x) {
    Tensor rounded = tensor(x.rows, x.cols);
    by_elements(x, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i++) rounded.data[i] = round_to_bf16(x.data[i]);
    });
    return rounded;
  }

  void rotary(Tensor& x, int64_t num_heads, std::span<const int32_t> positions, const RopeTables& rope) override {
    const int64_t head_dim = x.cols / num_heads, half = rope.half_dim;
    by_rows(x.rows, x.cols, [&](int64_t t) {
      const float* cos = rope.cos_at(positions[t]);
      const float* sin = rope.sin_at(positions[t]);
      for (int64_t h = 0; h < num_heads; h++) {
        float* v = x.row(t) + h * head_dim;
        for (int64_t i = 0; i < half; i++) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cos[i] - b * sin[i];
          v[i + half] = b * cos[i] + a * sin[i];
        }
      }
    });
  }

  void cache_update(KVCache& cache, int64_t layer, const Tensor& k, const Tensor& v,
                    std::span<const int32_t> positions) override {
    cpu::cache_update(cache, layer, k, v, positions);
  }

  void attention(const Tensor& q, KVCache& cache, int64_t layer, std::span<const int32_t> positions,
                 Tensor& out) override {
    cpu::attention(q, cache, layer, positions, out, pool_);
  }

  void gather_rows(const Tensor& x, std::span<const int64_t> rows, Tensor& out) override {
    for (size_t i = 0; i < rows.size(); i++) std::copy_n(x.row(rows[i]), x.cols, out.row(int64_t(i)));
  }

  void add(Tensor& x, const Tensor& y) override {
    by_elements(x, [&](int64_t begin, int64_t end) { add_range(x.data, y.data, begin, end); });
  }

  void relu_squared(Tensor& x) override {
    by_elements(x, [&](int64_t begin, int64_t end) { relu_squared_range(x.data, begin, end); });
  }

  void silu_mul(Tensor& gate, const Tensor& up) override {
    by_elements(gate, [&](int64_t begin, int64_t end) { silu_mul_range(gate.data, up.data, begin, end); });
  }

 private:
  // Element-wise and per-row loops go over the pool too once they are large (a prompt's MLP
  // activations): on one thread they were 5% of a 512-token prefill, with the other cores idle.
  // Small ones (a decode step's) stay on the calling thread (ThreadPool's work threshold).
  // f(begin, end) does elements [begin, end).
  template <class F>
  void by_elements(const Tensor& x, const F& f) {
    constexpr int64_t kChunk = 1 << 14;
    pool_.parallel_for(x.rows * x.cols, kChunk, x.rows * x.cols, f);
  }
  template <class F>
  void by_rows(int64_t rows, int64_t cols, const F& f) {
    pool_.parallel_for(rows, 1, rows * cols, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; t++) f(t);
    });
  }

  cpu::ThreadPool pool_;
  cpu::Int8Rows int8_rows_;  // the current matmul's activations, quantized (reused between calls)
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) { return std::make_unique<CpuBackend>(num_threads); }

}  // namespace afm
