// The engine's front door: build_model() reads an HF checkpoint folder, picks the model family
// from config.json's "architectures", and returns a Model whose forward() runs on a backend.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "backend.h"
#include "config.h"
#include "kv_cache.h"
#include "safetensors.h"
#include "weight.h"

namespace afm {

struct ModelOptions {
  Device device = Device::cpu();
  int64_t max_seq_len = 0;                    // 0: the config's limit, capped by available memory
  WeightFormat weights = WeightFormat::F32;
  std::optional<KVCacheType> kv_cache;        // unset: default_kv_cache_type(weights)
  // What bfp8/bfp4 matmuls round their input to (weight.h): Int16, in blocks of 16 for the int8
  // GEMM where the CPU has it, and bf16 (the bring-up note's numerics) where it does not; BF16
  // always; or Int8, faster and coarser. Unset: default_block_float_inputs(weights). Other
  // formats ignore it. docs/ACCURACY.md.
  std::optional<MatmulInputs> block_float_inputs;
  int num_threads = 0;                        // 0: all cores
  // Bytes the weights and one full-length KV cache may take; 0: the memory available now.
  int64_t max_memory = 0;
  std::function<void(int64_t done, int64_t total)> on_progress;  // called as weight layers load
};

// The KV cache element type a weight format gets unless asked otherwise: f32 for f32 weights,
// which must match transformers to f32 rounding, and f16 for the reduced formats, whose accuracy
// bars it keeps (docs/ACCURACY.md) while halving the cache bytes every decode step reads.
KVCacheType default_kv_cache_type(WeightFormat weights);

// What bfp8/bfp4 matmuls read unless asked otherwise: int16 for bfp8, which keeps bf16's accuracy
// bars, and int8 for bfp4, whose own rounding (a 3-bit magnitude) is 18x int8's, so that int16
// buys it nothing measurable at twice the dot products (1.3x prefill; docs/ACCURACY.md).
MatmulInputs default_block_float_inputs(WeightFormat weights);

// Bytes of memory the OS can still give this process (MemAvailable), 0 when unknown.
int64_t available_memory();

// Called with the input of each decoder layer (layer < num_layers) and, last, with the final
// norm's output (layer == num_layers): the same points as HF's output_hidden_states.
using HiddenStateTap = std::function<void(int64_t layer, const Tensor& hidden)>;

enum class Logits { All, Last };  // rows of logits to compute: every position, or only the last

// One sequence's part of a batched forward: new tokens, at the positions that continue its cache.
struct SequenceInput {
  std::span<const int32_t> tokens;
  KVCache* cache;
};

class Model {
 public:
  virtual ~Model() = default;

  const ModelConfig& config() const { return config_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  WeightFormat weight_format() const { return weight_format_; }
  KVCacheType kv_cache_type() const { return pool_->shape().type; }
  // Bytes of cached keys and values per position (every layer), in the cache's element type.
  int64_t kv_bytes_per_position() const { return pool_->shape().bytes_per_position(); }
  // Bytes of weights one decode step reads (every matmul; the embedding row is negligible).
  int64_t matmul_weight_bytes() const { return matmul_weight_bytes_; }
  std::unique_ptr<KVCache> new_cache() const { return std::make_unique<KVCache>(pool_, max_seq_len_); }
  // The pool every cache of this model draws its blocks from: room for one sequence of
  // max_seq_len unless resized. Blocks take memory only once used.
  const std::shared_ptr<BlockPool>& kv_pool() const { return pool_; }
  // Makes the pool `blocks` blocks, for many sequences at once; throws afm::Error while a cache
  // of this model exists.
  void resize_kv_pool(int64_t blocks);

  // Run `tokens` at `positions` (which must continue the cache: cache.length(), +1, ...),
  // appending their keys and values to `cache`. Returns logits [T or 1, vocab].
  Tensor forward(std::span<const int32_t> tokens, std::span<const int32_t> positions, KVCache& cache,
                 Logits rows = Logits::All, const HiddenStateTap& tap = nullptr);
  // Several sequences in one pass, each continuing its own cache: every matmul reads its weights
  // once for all of their tokens. Returns the logits of every token of each sequence in turn
  // (Logits::All) or of each sequence's last token, one row per sequence (Logits::Last). A row's
  // logits are what the sequence would get alone, up to f32 rounding.
  virtual Tensor forward(std::span<const SequenceInput> batch, Logits rows = Logits::Last,
                         const HiddenStateTap& tap = nullptr) = 0;

 protected:
  explicit Model(const struct ModelContext& context);
  ModelConfig config_;
  int64_t max_seq_len_ = 0;
  WeightFormat weight_format_ = WeightFormat::F32;
  int64_t matmul_weight_bytes_ = 0;
  std::shared_ptr<BlockPool> pool_;
};

// Everything a model family needs to construct itself.
struct ModelContext {
  ModelConfig config;
  Checkpoint checkpoint;
  ModelOptions options;
  std::unique_ptr<Backend> backend;
};

// Hands out checkpoint tensors by name with their expected shape, uploaded to `backend` when
// given, and afterwards reports any tensor in the checkpoint that the model never asked for.
class WeightLoader {
 public:
  WeightLoader(const Checkpoint& checkpoint, const ModelOptions& options, Backend& backend)
      : checkpoint_(checkpoint),
        block_float_inputs_(options.block_float_inputs.value_or(default_block_float_inputs(options.weights))),
        backend_(backend) {}
  Weight matrix(const std::string& name, int64_t rows, int64_t cols, WeightFormat format);
  Weight vector(const std::string& name, int64_t size);  // norm weights: always exact
  bool contains(const std::string& name) const { return checkpoint_.contains(name); }
  void check_all_used() const;

 private:
  const TensorView& fetch(const std::string& name, std::vector<int64_t> shape);
  const TensorView& make_random(const std::string& name, std::vector<int64_t> shape);
  const Checkpoint& checkpoint_;
  MatmulInputs block_float_inputs_;
  Backend& backend_;
  std::vector<std::string> used_;
  std::map<std::string, TensorView> random_;  // tensors made up for a random checkpoint
};

std::unique_ptr<Model> build_model(const std::string& checkpoint_dir, const ModelOptions& options = {});
// The same from a parsed config and an opened (or random) checkpoint.
std::unique_ptr<Model> build_model(const ModelConfig& config, Checkpoint checkpoint, const ModelOptions& options);
inline std::unique_ptr<Model> build_model(const std::string& checkpoint_dir, Device device, int64_t max_seq_len = 0) {
  ModelOptions options;
  options.device = device;
  options.max_seq_len = max_seq_len;
  return build_model(checkpoint_dir, options);
}

}  // namespace afm
