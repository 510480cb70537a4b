#include "config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <type_traits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "error.h"

namespace afm {

using json = nlohmann::json;

namespace {

// j[key] as T; integers must be whole numbers in T's range, so 64.7 or 2^32 is no silent truncation.
template <typename T>
T convert(const json& j, const char* key, const std::string& source) {
  const json& value = j[key];
  const Error wrong_type(source + ": key \"" + key + "\" has the wrong type or range (" + value.dump() + ")");
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    if (!value.is_number_integer()) throw wrong_type;
    const int64_t v = value.get<int64_t>();
    if (value.is_number_unsigned() && value.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())) throw wrong_type;
    if (v < int64_t(std::numeric_limits<T>::min()) || v > int64_t(std::numeric_limits<T>::max())) throw wrong_type;
    return T(v);
  } else {
    try {
      return value.get<T>();
    } catch (const json::exception&) {
      throw wrong_type;
    }
  }
}

template <typename T>
T required(const json& j, const char* key, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) throw Error(source + ": missing required key \"" + key + "\"");
  return convert<T>(j, key, source);
}

template <typename T>
T optional_key(const json& j, const char* key, T fallback, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  return convert<T>(j, key, source);
}

std::optional<double> maybe_double(const json& j, const char* key, const std::string& source) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  return convert<double>(j, key, source);
}

RopeConfig parse_rope(const json& root, int64_t max_positions, const std::string& source) {
  RopeConfig rope;
  // v5 keeps rope_theta inside rope_parameters; v4 keeps it at the top with an optional rope_scaling.
  const json* scaling = nullptr;
  if (root.contains("rope_parameters") && root["rope_parameters"].is_object()) scaling = &root["rope_parameters"];
  else if (root.contains("rope_scaling") && root["rope_scaling"].is_object()) scaling = &root["rope_scaling"];

  rope.theta = optional_key<double>(root, "rope_theta", 10000.0, source);
  rope.partial_rotary_factor = optional_key<double>(root, "partial_rotary_factor", 1.0, source);
  rope.original_max_position_embeddings = max_positions;
  if (!scaling) return rope;

  const json& s = *scaling;
  const std::string where = source + ": rope parameters";
  rope.theta = optional_key<double>(s, "rope_theta", rope.theta, where);
  rope.partial_rotary_factor = optional_key<double>(s, "partial_rotary_factor", rope.partial_rotary_factor, where);
  rope.type = optional_key<std::string>(s, "rope_type", optional_key<std::string>(s, "type", "default", where), where);
  rope.factor = optional_key<double>(s, "factor", 1.0, where);
  rope.original_max_position_embeddings =
      optional_key<int64_t>(s, "original_max_position_embeddings", max_positions, where);
  // transformers treats a beta of 0 or null as "use the default", hence value_or on a truthy check.
  double beta_fast = optional_key<double>(s, "beta_fast", 0.0, where);
  double beta_slow = optional_key<double>(s, "beta_slow", 0.0, where);
  rope.beta_fast = beta_fast ? beta_fast : 32.0;
  rope.beta_slow = beta_slow ? beta_slow : 1.0;
  rope.attention_factor = maybe_double(s, "attention_factor", where);
  rope.mscale = maybe_double(s, "mscale", where);
  rope.mscale_all_dim = maybe_double(s, "mscale_all_dim", where);
  rope.truncate = optional_key<bool>(s, "truncate", true, where);
  rope.low_freq_factor = optional_key<double>(s, "low_freq_factor", 1.0, where);
  rope.high_freq_factor = optional_key<double>(s, "high_freq_factor", 4.0, where);

  if (rope.type != "default" && rope.type != "linear" && rope.type != "yarn" && rope.type != "llama3")
    throw Error(where + ": unsupported rope_type \"" + rope.type + "\" (supported: default, linear, yarn, llama3)");
  if (rope.type != "default" && rope.factor <= 0) throw Error(where + ": factor must be positive");
  return rope;
}

// A token id or a list of them, as eos_token_id may be either.
// Values the RoPE formulas divide by or take logarithms of; out of range they give NaN silently.
void check_rope(const RopeConfig& rope, const std::string& where) {
  if (!std::isfinite(rope.theta) || rope.theta <= (rope.type == "yarn" ? 1.0 : 0.0))
    throw Error(where + ": rope_theta must be a positive number" + (rope.type == "yarn" ? " above 1" : ""));
  if ((rope.type == "yarn" || rope.type == "llama3") && rope.original_max_position_embeddings <= 0)
    throw Error(where + ": original_max_position_embeddings must be positive");
  if (rope.type == "llama3" && !(rope.high_freq_factor > rope.low_freq_factor && rope.low_freq_factor > 0))
    throw Error(where + ": llama3 rope needs 0 < low_freq_factor < high_freq_factor");
  if (!(rope.partial_rotary_factor > 0 && rope.partial_rotary_factor <= 1))
    throw Error(where + ": partial_rotary_factor must be in (0, 1]");
}

std::vector<int32_t> parse_ids(const json& root, const char* key, const std::string& source) {
  if (!root.contains(key) || root[key].is_null()) return {};
  if (!root[key].is_array()) return {convert<int32_t>(root, key, source)};
  std::vector<int32_t> ids;
  for (size_t i = 0; i < root[key].size(); i++) {
    const json element = {{key, root[key][i]}};
    ids.push_back(convert<int32_t>(element, key, source));
  }
  return ids;
}

// Upper bounds far above any released model (Llama 3.1 405B: hidden 16384, intermediate 53248,
// 126 layers, 128 heads, vocab 128256), so that a hostile config is refused before anything is
// sized from it, and every product the engine forms from them (weights of hidden x vocab, a KV
// cache of layers x kv heads x head_dim x positions, in bytes) stays far inside int64.
struct Limit {
  const char* key;
  int64_t ModelConfig::*field;
  int64_t max;
};
constexpr Limit kLimits[] = {
    {"hidden_size", &ModelConfig::hidden_size, int64_t(1) << 20},
    {"intermediate_size", &ModelConfig::intermediate_size, int64_t(1) << 22},
    {"num_hidden_layers", &ModelConfig::num_layers, 4096},
    {"num_attention_heads", &ModelConfig::num_heads, int64_t(1) << 16},
    {"num_key_value_heads", &ModelConfig::num_kv_heads, int64_t(1) << 16},
    {"head_dim", &ModelConfig::head_dim, int64_t(1) << 16},
    {"vocab_size", &ModelConfig::vocab_size, int64_t(1) << 24},
    {"max_position_embeddings", &ModelConfig::max_position_embeddings, INT32_MAX},  // positions are int32
};

}  // namespace

void check_config_limits(const ModelConfig& c, const std::string& source) {
  for (const Limit& limit : kLimits)
    if (c.*limit.field > limit.max)
      throw Error(source + ": " + limit.key + " " + std::to_string(c.*limit.field) + " is above afm's limit of " +
                  std::to_string(limit.max));
}

ModelConfig parse_config(const std::string& json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    throw Error(source + ": malformed JSON: " + e.what());
  }
  if (!root.is_object()) throw Error(source + ": expected a JSON object");

  ModelConfig c;
  auto architectures = optional_key<std::vector<std::string>>(root, "architectures", {}, source);
  if (architectures.empty()) throw Error(source + ": no \"architectures\" entry, so the model family is unknown");
  c.architecture = architectures[0];
  c.hidden_size = required<int64_t>(root, "hidden_size", source);
  c.intermediate_size = required<int64_t>(root, "intermediate_size", source);
  c.num_layers = required<int64_t>(root, "num_hidden_layers", source);
  c.num_heads = required<int64_t>(root, "num_attention_heads", source);
  c.num_kv_heads = optional_key<int64_t>(root, "num_key_value_heads", c.num_heads, source);
  c.vocab_size = required<int64_t>(root, "vocab_size", source);
  if (c.num_heads <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.vocab_size <= 0 || c.intermediate_size <= 0)
    throw Error(source + ": sizes must be positive");
  const bool explicit_head_dim = root.contains("head_dim") && !root["head_dim"].is_null();
  if (!explicit_head_dim && c.hidden_size % c.num_heads != 0)
    throw Error(source + ": hidden_size (" + std::to_string(c.hidden_size) + ") is not a multiple of num_attention_heads (" +
                std::to_string(c.num_heads) + "), and there is no head_dim");
  c.head_dim = optional_key<int64_t>(root, "head_dim", c.hidden_size / c.num_heads, source);
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
    throw Error(source + ": num_attention_heads (" + std::to_string(c.num_heads) +
                ") must be a multiple of num_key_value_heads (" + std::to_string(c.num_kv_heads) + ")");
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) throw Error(source + ": head_dim must be positive and even");
  c.max_position_embeddings = optional_key<int64_t>(root, "max_position_embeddings", 2048, source);
  if (c.max_position_embeddings <= 0) throw Error(source + ": max_position_embeddings must be positive");
  check_config_limits(c, source);
  c.rms_norm_eps = optional_key<double>(root, "rms_norm_eps", 1e-6, source);
  c.hidden_act = optional_key<std::string>(root, "hidden_act", "silu", source);
  c.tie_word_embeddings = optional_key<bool>(root, "tie_word_embeddings", false, source);
  c.attention_bias = optional_key<bool>(root, "attention_bias", false, source);
  c.mlp_bias = optional_key<bool>(root, "mlp_bias", false, source);
  c.rope = parse_rope(root, c.max_position_embeddings, source);
  check_rope(c.rope, source);
  if (!std::isfinite(c.rms_norm_eps) || c.rms_norm_eps < 0) throw Error(source + ": rms_norm_eps must be a non-negative number");
  if (auto bos = parse_ids(root, "bos_token_id", source); !bos.empty()) c.bos_token_id = bos[0];
  c.eos_token_ids = parse_ids(root, "eos_token_id", source);
  return c;
}

ModelConfig load_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw Error("cannot read " + path + " (is this an HF model folder?)");
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path);
}

}  // namespace afm
