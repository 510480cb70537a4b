// The op set a model is written against, in the bring-up note's vocabulary. A backend (one folder
// under src/backends/) implements it for one kind of device. Activations are f32 row-major
// matrices [tokens, features]; weights are whatever WeightFormat the model was loaded with.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "kv_cache.h"
#include "rope.h"
#include "weight.h"

namespace afm {

enum class DeviceKind { Cpu, Cuda };

struct Device {
  DeviceKind kind = DeviceKind::Cpu;
  static Device cpu() { return {DeviceKind::Cpu}; }
  static Device parse(const std::string& name);  // "cpu" or "cuda"; throws afm::Error
  std::string name() const;
};

// An activation matrix in the backend's memory.
struct Tensor {
  float* data = nullptr;
  int64_t rows = 0, cols = 0;
  std::shared_ptr<float[]> storage;

  float* row(int64_t r) { return data + r * cols; }
  const float* row(int64_t r) const { return data + r * cols; }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual Tensor tensor(int64_t rows, int64_t cols) = 0;
  // Each weight once, at load: the backend may lay it out for its own kernels (WeightLayout::Backend)
  // or move it into its memory. What it returns is what the model passes to the ops.
  virtual Weight upload(Weight w) { return w; }
  // Each checkpoint matrix once, at load: converted to `format` for matmuls that round their
  // inputs to `inputs` (a block-float format's; others keep make_weight's) and uploaded. A
  // backend may instead convert it straight into its own layout, never holding the rows.
  virtual Weight load_matrix(const TensorView& view, WeightFormat format, MatmulInputs inputs);

  // out[t] = table[ids[t]]
  virtual void embedding(const Weight& table, std::span<const int32_t> ids, Tensor& out) = 0;
  // out = x / rms(x) * weight, in f32 (HF's RMSNorm)
  virtual void rms_norm(const Tensor& x, const Weight& weight, float eps, Tensor& out) = 0;
  // out = x @ w^T
  virtual void linear(const Tensor& x, const Weight& w, Tensor& out) = 0;
  // Rotate each head of x in place by its token's position (rotate-half layout).
  virtual void rotary(Tensor& x, int64_t num_heads, std::span<const int32_t> positions, const RopeTables& rope) = 0;
  // Write k and v rows at their positions: a prompt fills the cache, a decode step appends to it.
  virtual void cache_update(KVCache& cache, int64_t layer, const Tensor& k, const Tensor& v,
                            std::span<const int32_t> positions) = 0;
  // Causal GQA attention of each query row against the cache up to its own position
  // (many rows: prefill; one row: decode).
  virtual void attention(const Tensor& q, KVCache& cache, int64_t layer, std::span<const int32_t> positions,
                         Tensor& out) = 0;

  // out[i] = x[rows[i]]: the rows a batch needs logits for.
  virtual void gather_rows(const Tensor& x, std::span<const int64_t> rows, Tensor& out) = 0;

  // Element-wise pieces of the residual stream and the MLPs.
  virtual void add(Tensor& x, const Tensor& y) = 0;             // x += y
  virtual void relu_squared(Tensor& x) = 0;                     // x = relu(x)^2
  virtual void silu_mul(Tensor& gate, const Tensor& up) = 0;    // gate = silu(gate) * up
};

std::unique_ptr<Backend> make_backend(Device device, int num_threads = 0);

}  // namespace afm
