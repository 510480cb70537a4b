// The CPU backend: the op set in plain loops, parallel over output rows or heads on a thread
// pool, with the inner dot products in runtime-dispatched SIMD kernels (dot.h).
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend.h"
#include "backends/cpu/dot.h"
#include "backends/cpu/thread_pool.h"
#include "error.h"
#include "numeric.h"

namespace afm {

namespace {

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
    for (int64_t t = 0; t < x.rows; t++) {
      const float* in = x.row(t);
      double sum_squares = 0;
      for (int64_t c = 0; c < x.cols; c++) sum_squares += double(in[c]) * in[c];
      const float scale = 1.0f / std::sqrt(float(sum_squares / double(x.cols)) + eps);
      float* o = out.row(t);
      for (int64_t c = 0; c < x.cols; c++) o[c] = gamma[c] * (in[c] * scale);
    }
  }

  void linear(const Tensor& x_in, const Weight& w, Tensor& out) override {
    const Tensor x = w.bf16_inputs ? rounded_to_bf16(x_in) : x_in;
    const cpu::DotFn dot = cpu::dot_kernel(w.format);
    const int64_t T = x.rows, N = w.rows, K = w.cols;
    // Blocks of weight rows stay in cache while every group of 4 tokens passes over them.
    constexpr int64_t kRowBlock = 16, kTokens = 4;
    parallel_for(N, kRowBlock, T * N * K, [&](int64_t n0, int64_t n1) {
      float result[kTokens];
      for (int64_t t0 = 0; t0 < T; t0 += kTokens) {
        const int nt = int(std::min(kTokens, T - t0));
        for (int64_t n = n0; n < n1; n++) {
          dot(w.data + n * w.row_bytes, x.row(t0), K, nt, K, result);
          for (int j = 0; j < nt; j++) out.row(t0 + j)[n] = result[j];
        }
      }
    });
  }

  Tensor rounded_to_bf16(const Tensor& x) {
    Tensor rounded = tensor(x.rows, x.cols);
    for (int64_t i = 0; i < x.rows * x.cols; i++) rounded.data[i] = round_to_bf16(x.data[i]);
    return rounded;
  }

  void rotary(Tensor& x, int64_t num_heads, std::span<const int32_t> positions, const RopeTables& rope) override {
    const int64_t head_dim = x.cols / num_heads, half = rope.half_dim;
    for (int64_t t = 0; t < x.rows; t++) {
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
    }
  }

  void cache_update(KVCache& cache, int64_t layer, const Tensor& k, const Tensor& v,
                    std::span<const int32_t> positions) override {
    const KVShape& s = cache.shape();
    for (int64_t t = 0; t < k.rows; t++) {
      for (int64_t h = 0; h < s.num_kv_heads; h++) {
        std::copy_n(k.row(t) + h * s.head_dim, s.head_dim, cache.key(layer, h, positions[t]));
        std::copy_n(v.row(t) + h * s.head_dim, s.head_dim, cache.value(layer, h, positions[t]));
      }
    }
  }

  // Per token and kv head: the `group` query heads that share it are adjacent in q, so each key
  // is read once and scored against all of them with the SIMD dot kernel (keys are f32 rows).
  void attention(const Tensor& q, KVCache& cache, int64_t layer, std::span<const int32_t> positions,
                 Tensor& out) override {
    const KVShape& s = cache.shape();
    const int64_t head_dim = s.head_dim, group = q.cols / head_dim / s.num_kv_heads;
    const float scale = 1.0f / std::sqrt(float(head_dim));
    const cpu::DotFn dot = cpu::dot_kernel(WeightFormat::F32);
    const int64_t work = q.rows * q.cols * (positions.back() + 1);
    parallel_for(q.rows * s.num_kv_heads, 1, work, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;  // [group][visible]
      for (int64_t item = begin; item < end; item++) {
        const int64_t t = item / s.num_kv_heads, kv_head = item % s.num_kv_heads;
        const int64_t visible = int64_t(positions[t]) + 1;
        const float* queries = q.row(t) + kv_head * group * head_dim;
        scores.resize(group * visible);
        for (int64_t p = 0; p < visible; p++) {
          const auto* key = reinterpret_cast<const uint8_t*>(cache.key(layer, kv_head, p));
          float dots[cpu::kMaxDotRows];
          for (int64_t h0 = 0; h0 < group; h0 += cpu::kMaxDotRows) {
            const int n = int(std::min<int64_t>(cpu::kMaxDotRows, group - h0));
            dot(key, queries + h0 * head_dim, head_dim, n, head_dim, dots);
            for (int j = 0; j < n; j++) scores[(h0 + j) * visible + p] = dots[j] * scale;
          }
        }
        for (int64_t h = 0; h < group; h++) {  // softmax of each head's row, in place
          float* row = &scores[h * visible];
          const float max_score = *std::max_element(row, row + visible);
          float sum = 0;
          for (int64_t p = 0; p < visible; p++) sum += row[p] = std::exp(row[p] - max_score);
          for (int64_t p = 0; p < visible; p++) row[p] /= sum;
        }
        float* o = out.row(t) + kv_head * group * head_dim;
        std::fill_n(o, group * head_dim, 0.0f);
        for (int64_t p = 0; p < visible; p++) {
          const float* value = cache.value(layer, kv_head, p);
          for (int64_t h = 0; h < group; h++) {
            const float weight = scores[h * visible + p];
            for (int64_t d = 0; d < head_dim; d++) o[h * head_dim + d] += weight * value[d];
          }
        }
      }
    });
  }

  void add(Tensor& x, const Tensor& y) override {
    for (int64_t i = 0; i < x.rows * x.cols; i++) x.data[i] += y.data[i];
  }

  void relu_squared(Tensor& x) override {
    for (int64_t i = 0; i < x.rows * x.cols; i++) {
      const float r = std::max(x.data[i], 0.0f);
      x.data[i] = r * r;
    }
  }

  // Below about 65k multiply-adds one thread finishes before the others could start.
  void parallel_for(int64_t n, int64_t chunk, int64_t multiply_adds, const std::function<void(int64_t, int64_t)>& body) {
    if (multiply_adds < (int64_t(1) << 16)) return body(0, n);
    pool_.parallel_for(n, chunk, body);
  }

  void silu_mul(Tensor& gate, const Tensor& up) override {
    for (int64_t i = 0; i < gate.rows * gate.cols; i++) {
      const float g = gate.data[i];
      gate.data[i] = g / (1.0f + std::exp(-g)) * up.data[i];
    }
  }

 private:
  cpu::ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) { return std::make_unique<CpuBackend>(num_threads); }

}  // namespace afm
