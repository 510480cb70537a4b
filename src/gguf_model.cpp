#include "gguf_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "error.h"
#include "tokenizer.h"

namespace afm {

namespace {

// The GGUF architectures afm runs, and the HF architecture each was converted from.
struct GGUFArchitecture {
  const char* gguf_name;
  const char* hf_architecture;
  const char* hidden_act;
};
constexpr GGUFArchitecture kArchitectures[] = {
    {"llama", "LlamaForCausalLM", "silu"},
    {"arcee", "ArceeForCausalLM", "relu2"},
};

const GGUFArchitecture& architecture_of(const GGUFFile& file) {
  const std::string_view name = file.string("general.architecture").value_or("");
  for (const GGUFArchitecture& a : kArchitectures)
    if (name == a.gguf_name) return a;
  throw Error(file.path() + ": GGUF architecture \"" + std::string(name) + "\" is not supported (afm reads llama, arcee)");
}

// One `{arch}.key` of the file's architecture.
struct ArchKeys {
  const GGUFFile& file;
  std::string prefix;

  std::string key(const char* name) const { return prefix + name; }
  int64_t required(const char* name) const {
    if (auto v = file.integer(key(name))) return *v;
    throw Error(file.path() + ": missing metadata " + key(name));
  }
};

// llama.cpp's rope_freqs tensor: one f32 divisor per rotary pair (its form of Llama 3's scaling).
std::vector<float> rope_freq_factors(const GGUFFile& file) {
  const TensorView* t = file.find_tensor("rope_freqs.weight");
  if (!t) return {};
  if (t->dtype != DType::F32 || t->shape.size() != 1) throw Error(file.path() + ": " + t->describe() + " should be F32 [n]");
  std::vector<float> factors = t->to_f32();
  for (float f : factors)
    if (!(f > 0)) throw Error(file.path() + ": rope_freqs.weight holds a factor that is not positive");
  return factors;
}

}  // namespace

ModelConfig gguf_model_config(const GGUFFile& file) {
  const GGUFArchitecture& arch = architecture_of(file);
  const ArchKeys k{file, std::string(arch.gguf_name) + "."};
  const std::string& source = file.path();

  ModelConfig c;
  c.architecture = arch.hf_architecture;
  c.hidden_act = arch.hidden_act;
  c.hidden_size = k.required("embedding_length");
  c.intermediate_size = k.required("feed_forward_length");
  c.num_layers = k.required("block_count");
  c.num_heads = k.required("attention.head_count");
  c.num_kv_heads = file.integer(k.key("attention.head_count_kv")).value_or(c.num_heads);
  if (c.num_heads <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.intermediate_size <= 0)
    throw Error(source + ": sizes must be positive");
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0)
    throw Error(source + ": attention.head_count (" + std::to_string(c.num_heads) +
                ") must be a multiple of attention.head_count_kv (" + std::to_string(c.num_kv_heads) + ")");
  const std::optional<int64_t> key_length = file.integer(k.key("attention.key_length"));
  if (!key_length && c.hidden_size % c.num_heads != 0)
    throw Error(source + ": embedding_length (" + std::to_string(c.hidden_size) + ") is not a multiple of attention.head_count (" +
                std::to_string(c.num_heads) + "), and there is no attention.key_length");
  c.head_dim = key_length.value_or(c.hidden_size / c.num_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) throw Error(source + ": the head dimension must be positive and even");
  const int64_t tokens = int64_t(file.strings("tokenizer.ggml.tokens").size());
  c.vocab_size = file.integer(k.key("vocab_size")).value_or(tokens);
  if (c.vocab_size <= 0) throw Error(source + ": no vocab_size and no tokenizer.ggml.tokens");
  c.max_position_embeddings = file.integer(k.key("context_length")).value_or(2048);
  if (c.max_position_embeddings <= 0) throw Error(source + ": context_length must be positive");
  check_config_limits(c, source);
  c.rms_norm_eps = file.number(k.key("attention.layer_norm_rms_epsilon")).value_or(1e-5);
  if (!std::isfinite(c.rms_norm_eps) || c.rms_norm_eps < 0) throw Error(source + ": rms epsilon must be a non-negative number");
  // llama.cpp writes the output projection only when it is not the embedding.
  c.tie_word_embeddings = file.find_tensor("output.weight") == nullptr;

  RopeConfig& rope = c.rope;
  rope.theta = file.number(k.key("rope.freq_base")).value_or(10000.0);
  if (auto rotary = file.integer(k.key("rope.dimension_count")))
    rope.partial_rotary_factor = double(*rotary) / double(c.head_dim);
  rope.original_max_position_embeddings =
      file.integer(k.key("rope.scaling.original_context_length")).value_or(c.max_position_embeddings);
  std::string scaling(file.string(k.key("rope.scaling.type")).value_or("none"));
  rope.factor = file.number(k.key("rope.scaling.factor")).value_or(1.0);
  if (auto linear = file.number(k.key("rope.scale_linear"))) {  // older files' form of linear scaling
    scaling = "linear";
    rope.factor = *linear;
  }
  if (scaling == "none") {
    rope.type = "default";
  } else if (scaling == "linear" || scaling == "yarn") {
    rope.type = scaling;
  } else {
    throw Error(source + ": rope.scaling.type \"" + scaling + "\" is not supported (none, linear, yarn)");
  }
  // HF's YaRN defaults stand unless the file says otherwise (llama.cpp's converter writes betas
  // only for models whose config sets them).
  rope.beta_fast = file.number(k.key("rope.scaling.yarn_beta_fast")).value_or(rope.beta_fast);
  rope.beta_slow = file.number(k.key("rope.scaling.yarn_beta_slow")).value_or(rope.beta_slow);
  if (auto attention_factor = file.number(k.key("rope.scaling.attn_factor"))) rope.attention_factor = *attention_factor;
  if (rope.type != "default" && !(rope.factor > 0)) throw Error(source + ": rope.scaling.factor must be positive");
  if (!std::isfinite(rope.theta) || rope.theta <= 1.0) throw Error(source + ": rope.freq_base must be above 1");
  rope.freq_factors = rope_freq_factors(file);

  // Token ids are int32 in the engine, as in config.json: refused beyond, not wrapped.
  auto token_id = [&](const char* key) -> std::optional<int32_t> {
    const std::optional<int64_t> id = file.integer(key);
    if (id && (*id < INT32_MIN || *id > INT32_MAX)) throw Error(source + ": " + key + " " + std::to_string(*id) + " is out of range");
    return id ? std::optional<int32_t>(int32_t(*id)) : std::nullopt;
  };
  c.bos_token_id = token_id("tokenizer.ggml.bos_token_id");
  // Generation ends at eos and at the end-of-turn tokens, as in llama.cpp.
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"})
    if (auto id = token_id(key); id && std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), *id) == c.eos_token_ids.end())
      c.eos_token_ids.push_back(*id);
  return c;
}

namespace {

// HF's name for a GGUF tensor name (llama.cpp's tensor map, for the Llama layout).
std::string hf_tensor_name(const std::string& name) {
  static const std::pair<const char*, const char*> kGlobal[] = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  static const std::pair<const char*, const char*> kLayer[] = {
      {"attn_norm", "input_layernorm"},     {"attn_q", "self_attn.q_proj"},     {"attn_k", "self_attn.k_proj"},
      {"attn_v", "self_attn.v_proj"},       {"attn_output", "self_attn.o_proj"}, {"ffn_norm", "post_attention_layernorm"},
      {"ffn_gate", "mlp.gate_proj"},        {"ffn_up", "mlp.up_proj"},           {"ffn_down", "mlp.down_proj"},
  };
  for (const auto& [gguf, hf] : kGlobal)
    if (name == gguf) return hf;
  // blk.N.PART.weight|bias
  if (!name.starts_with("blk.")) return name;
  const size_t layer_end = name.find('.', 4), part_end = name.rfind('.');
  if (layer_end == std::string::npos || part_end <= layer_end) return name;
  const std::string part = name.substr(layer_end + 1, part_end - layer_end - 1);
  for (const auto& [gguf, hf] : kLayer)
    if (part == gguf) return "model.layers." + name.substr(4, layer_end - 4) + "." + hf + name.substr(part_end);
  return name;  // unknown: the model loader reports it as an unexpected tensor
}

// llama.cpp's converter stores each head's rows as (pair, half) where HF has (half, pair). Row r
// of HF's head = half * d/2 + pair comes from GGUF row 2 * pair + half. Rows hold whole quant
// blocks (blocks run along the columns), so this moves bytes and never requantizes.
TensorView unpermute_rotary_rows(const TensorView& view, int64_t num_heads, const std::string& source) {
  const int64_t rows = view.shape[0];
  if (rows % (2 * num_heads) != 0)
    throw Error(source + ": " + view.describe() + " does not split into " + std::to_string(num_heads) + " heads");
  const int64_t head_dim = rows / num_heads, half = head_dim / 2, row_bytes = view.nbytes / rows;
  auto buffer = std::shared_ptr<uint8_t[]>(new uint8_t[view.nbytes]);
  for (int64_t h = 0; h < num_heads; h++)
    for (int64_t r = 0; r < head_dim; r++) {
      const int64_t from = h * head_dim + 2 * (r % half) + r / half;
      std::memcpy(buffer.get() + (h * head_dim + r) * row_bytes, view.data + from * row_bytes, row_bytes);
    }
  TensorView out = view;
  out.data = buffer.get();
  out.owner = buffer;
  out.file_mapped = false;
  return out;
}

}  // namespace

Checkpoint gguf_checkpoint(const GGUFFile& file, const ModelConfig& config) {
  std::map<std::string, TensorView> tensors;
  for (const TensorView& t : file.tensors()) {
    if (t.name == "rope_freqs.weight") continue;  // read into the config
    TensorView view = t;
    view.name = hf_tensor_name(t.name);
    if (view.shape.size() == 2 && view.name.ends_with("self_attn.q_proj.weight"))
      view = unpermute_rotary_rows(view, config.num_heads, file.path());
    else if (view.shape.size() == 2 && view.name.ends_with("self_attn.k_proj.weight"))
      view = unpermute_rotary_rows(view, config.num_kv_heads, file.path());
    if (!tensors.emplace(view.name, std::move(view)).second)
      throw Error(file.path() + ": two tensors map to " + hf_tensor_name(t.name));
  }
  return Checkpoint::from_tensors(file.path(), std::move(tensors));
}

namespace {

// Not ordered_json: its linear key search would make a 128k-token vocabulary quadratic to build.
using json = nlohmann::json;

// transformers' GGUF tokenizer respells a token outside the byte-level alphabet (a raw " " or
// "\n", say) from its UTF-8 bytes, so the vocabulary is all byte-level.
std::string vocabulary_spelling(std::string_view token) {
  return is_byte_level_spelled(token) ? std::string(token) : byte_level_spelling(token);
}

// Split patterns by tokenizer.ggml.pre, as transformers' GGUF loader pairs them; a type not
// listed keeps GPT-2's own pattern inside ByteLevel.
const char* split_regex(std::string_view pre) {
  static const char* kLlama3 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static const char* kQwen2 =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static const char* kTekken =
      R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static const char* kGpt4o =
      R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static const std::pair<const char*, const char*> kTable[] = {
      {"llama3", kLlama3},   {"llama-v3", kLlama3},   {"llama-bpe", kLlama3}, {"falcon3", kLlama3},
      {"falcon-h1", kLlama3}, {"pixtral", kLlama3},   {"midm-2.0", kLlama3},  {"lfm2", kLlama3},
      {"jina-v5-nano", kLlama3}, {"dbrx", kLlama3},   {"smaug-bpe", kLlama3}, {"tekken", kTekken},
      {"qwen2", kQwen2},     {"deepseek-r1-qwen", kQwen2}, {"kormo", kQwen2}, {"f2llmv2", kQwen2},
      {"megrez", kQwen2},    {"gpt-4o", kGpt4o},      {"llama4", kGpt4o},     {"kanana2", kGpt4o},
      {"talkie", kGpt4o},    {"minimax-m2", kGpt4o},
  };
  for (const auto& [name, regex] : kTable)
    if (pre == name) return regex;
  return nullptr;
}

json byte_level_step(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

constexpr int64_t kControl = 3, kUserDefined = 4;  // llama.cpp's token types

}  // namespace

std::string gguf_tokenizer_json(const GGUFFile& file) {
  const std::string& source = file.path();
  const auto model_type = file.string("tokenizer.ggml.model");
  if (!model_type) throw Error(source + " has no tokenizer (no tokenizer.ggml.model)");
  const std::string model(*model_type);
  if (model != "gpt2")
    throw Error(source + ": tokenizer.ggml.model \"" + model +
                "\" is not supported (afm reads gpt2-style byte-level BPE tokenizers)");
  const std::vector<std::string_view> tokens = file.strings("tokenizer.ggml.tokens");
  const std::vector<std::string_view> merges = file.strings("tokenizer.ggml.merges");
  const std::vector<int64_t> types = file.integers("tokenizer.ggml.token_type");
  if (tokens.empty()) throw Error(source + ": no tokenizer.ggml.tokens");
  if (!types.empty() && types.size() != tokens.size())
    throw Error(source + ": tokenizer.ggml.token_type has " + std::to_string(types.size()) + " entries for " +
                std::to_string(tokens.size()) + " tokens");

  json vocab = json::object();
  for (size_t id = 0; id < tokens.size(); id++) vocab[vocabulary_spelling(tokens[id])] = id;

  json merge_list = json::array();
  for (std::string_view m : merges) {
    const size_t space = m.find(' ');
    if (space == std::string_view::npos || m.find(' ', space + 1) != std::string_view::npos)
      throw Error(source + ": merge \"" + std::string(m) + "\" is not two tokens separated by one space");
    merge_list.push_back({m.substr(0, space), m.substr(space + 1)});
  }

  // Control tokens become special added tokens (unless spelled outside the alphabet, which is a
  // llama.cpp mislabel); user-defined ones in the vocabulary become plain added tokens.
  json added = json::array();
  for (size_t id = 0; id < types.size(); id++) {
    const bool control = types[id] == kControl && is_byte_level_spelled(tokens[id]);
    const bool user = types[id] == kUserDefined && vocab.contains(std::string(tokens[id]));
    if (!control && !user) continue;
    added.push_back({{"id", id}, {"content", tokens[id]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", control}});
  }

  // BOS/EOS the way the file asks for them (tokenizer.ggml.add_bos_token / add_eos_token).
  json single = json::array(), special_tokens = json::object();
  auto special = [&](const char* flag, const char* id_key) {
    const auto id = file.integer(id_key);
    if (!file.boolean(flag).value_or(false) || !id) return;
    if (*id < 0 || *id >= int64_t(tokens.size())) throw Error(source + ": " + id_key + " is not a token id");
    const std::string text(tokens[*id]);
    single.push_back({{"SpecialToken", {{"id", text}, {"type_id", 0}}}});
    special_tokens[text] = {{"id", text}, {"ids", {*id}}, {"tokens", {text}}};
  };
  special("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id");
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  special("tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id");

  json pre_tokenizer;
  if (const char* regex = split_regex(file.string("tokenizer.ggml.pre").value_or(""))) {
    pre_tokenizer = {{"type", "Sequence"},
                     {"pretokenizers",
                      {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}},
                       byte_level_step(false)}}};
  } else {
    pre_tokenizer = byte_level_step(true);
  }

  json tokenizer = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", pre_tokenizer},
      {"post_processor", {{"type", "TemplateProcessing"}, {"single", single}, {"special_tokens", special_tokens}}},
      {"decoder", byte_level_step(true)},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
        {"ignore_merges", false}, {"vocab", vocab}, {"merges", merge_list}}},
  };
  return tokenizer.dump(-1, ' ', false, json::error_handler_t::replace);
}

GGUFChatTemplate gguf_chat_template(const GGUFFile& file) {
  const auto source = file.string("tokenizer.chat_template");
  if (!source) throw Error(file.path() + " has no tokenizer.chat_template");
  const std::vector<std::string_view> tokens = file.strings("tokenizer.ggml.tokens");
  auto token_text = [&](const char* key) -> std::optional<std::string> {
    const auto id = file.integer(key);
    if (!id || *id < 0 || *id >= int64_t(tokens.size())) return std::nullopt;
    return std::string(tokens[*id]);
  };
  return {std::string(*source), token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id")};
}

}  // namespace afm
