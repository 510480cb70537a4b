// config.json of an HF causal LM, in transformers-v4 style (rope_theta + rope_scaling)
// or v5 style (rope_parameters). Only what the engine uses is kept.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace afm {

struct RopeConfig {
  std::string type = "default";  // default | linear | yarn | llama3
  double theta = 10000.0;
  double factor = 1.0;
  double partial_rotary_factor = 1.0;
  int64_t original_max_position_embeddings = 0;
  // yarn
  double beta_fast = 32.0, beta_slow = 1.0;
  std::optional<double> attention_factor, mscale, mscale_all_dim;
  bool truncate = true;
  // llama3
  double low_freq_factor = 1.0, high_freq_factor = 4.0;
  // Per-pair divisors of inv_freq, as GGUF files carry Llama 3's scaling (tensor rope_freqs).
  std::vector<float> freq_factors;
};

struct ModelConfig {
  std::string architecture;  // architectures[0], e.g. ArceeForCausalLM
  int64_t hidden_size = 0, intermediate_size = 0, num_layers = 0;
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0, vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  std::string hidden_act;
  bool tie_word_embeddings = false;
  bool attention_bias = false, mlp_bias = false;
  RopeConfig rope;
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;
};

ModelConfig load_config(const std::string& config_json_path);
ModelConfig parse_config(const std::string& json_text, const std::string& source_name);

// afm::Error naming `source` when a size is above the engine's limits (config.cpp says why
// each); parse_config applies them, and so does the GGUF reader to the config it derives.
void check_config_limits(const ModelConfig& config, const std::string& source);

}  // namespace afm
