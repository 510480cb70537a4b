// The checkpoint loader and the config parser, on the happy path and on broken checkpoints.
// Every bad-input case builds a real damaged checkpoint in a temporary folder (a copy of a fixture,
// then edited with the small safetensors reader/writer below) and checks that the afm::Error names
// the problem: the file, the tensor, the key, the dtype or the architecture at fault.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "config.h"
#include "error.h"
#include "model.h"
#include "safetensors.h"
#include "support/checkpoint_writer.h"

#ifndef AFM_SOURCE_DIR
#error "AFM_SOURCE_DIR must name the repository root"
#endif

namespace {

using namespace afm_test;  // files, TempDir, the safetensors reader/writer
namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

const fs::path kRepo = AFM_SOURCE_DIR;
const fs::path kTinyLlama = kRepo / "tests/fixtures/tiny-llama";
const fs::path kTinyArcee = kRepo / "tests/fixtures/tiny-arcee";
const fs::path kAusten = kRepo / "models/afm-tiny-austen";

constexpr int64_t kSeqLen = 256;
const char* kShard1 = "model-00001-of-00002.safetensors";
const char* kShard2 = "model-00002-of-00002.safetensors";

// ---------------------------------------------------------------------------------------------
// Files

// Copy what a checkpoint is made of (config, index, model*.safetensors) into dst, writable
// (the fixtures are read-only). Tokenizer and reference files are left behind: the loader
// does not read them.
fs::path copy_checkpoint(const fs::path& src, const fs::path& dst) {
  fs::create_directories(dst);
  for (const auto& entry : fs::directory_iterator(src)) {
    const std::string name = entry.path().filename().string();
    const bool wanted = name == "config.json" || name == "model.safetensors.index.json" ||
                        (name.starts_with("model") && name.ends_with(".safetensors"));
    if (!wanted) continue;
    fs::copy_file(entry.path(), dst / name);
    fs::permissions(dst / name, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::add);
  }
  return dst;
}

void edit_config(const fs::path& dir, const std::function<void(json&)>& edit) {
  json config = read_json(dir / "config.json");
  edit(config);
  write_json(dir / "config.json", config);
}

// Rewrite every BF16 tensor of a file as F32 (exact) or F16 (rounded).
void convert_bf16_tensors(const fs::path& path, const std::string& target) {
  edit_tensors(path, [&](TensorMap& tensors) {
    for (auto& [name, t] : tensors) {
      if (t.dtype != "BF16") continue;
      const size_t n = t.bytes.size() / 2;
      std::string out(n * (target == "F32" ? 4 : 2), '\0');
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        std::memcpy(&h, t.bytes.data() + 2 * i, 2);
        const float f = bf16_to_f32(h);
        if (target == "F32") {
          std::memcpy(out.data() + 4 * i, &f, 4);
        } else {
          const uint16_t b = f32_to_f16_bits(f);
          std::memcpy(out.data() + 2 * i, &b, 2);
        }
      }
      t.dtype = target;
      t.bytes = std::move(out);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Running the code under test

// The afm::Error message that f throws; a test failure if it throws nothing or something else.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const afm::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected afm::Error, got another exception: " << e.what();
    return std::string("<not an afm::Error> ") + e.what();
  }
  ADD_FAILURE() << "expected afm::Error, nothing was thrown";
  return "";
}

std::string load_error(const fs::path& dir) {
  return error_of([&] { afm::build_model(dir.string(), afm::Device::cpu(), kSeqLen); });
}

std::string open_error(const fs::path& file) {
  return error_of([&] { afm::SafetensorsFile::open(file.string()); });
}

std::string config_error(const json& config) {
  return error_of([&] { afm::parse_config(config.dump(), "test/config.json"); });
}

// Logits of every position of a short prompt.
std::vector<float> prompt_logits(const fs::path& dir) {
  auto model = afm::build_model(dir.string(), afm::Device::cpu(), kSeqLen);
  auto cache = model->new_cache();
  const std::vector<int32_t> tokens = {4096, 17, 923, 4001, 5, 250, 3};
  std::vector<int32_t> positions(tokens.size());
  for (size_t i = 0; i < positions.size(); i++) positions[i] = int32_t(i);
  const afm::Tensor logits = model->forward(tokens, positions, *cache);
  EXPECT_EQ(logits.rows, int64_t(tokens.size()));
  EXPECT_EQ(logits.cols, model->config().vocab_size);
  return std::vector<float>(logits.data, logits.data + logits.rows * logits.cols);
}

void expect_same_rope(const afm::RopeConfig& a, const afm::RopeConfig& b) {
  EXPECT_EQ(a.type, b.type);
  EXPECT_EQ(a.theta, b.theta);
  EXPECT_EQ(a.factor, b.factor);
  EXPECT_EQ(a.partial_rotary_factor, b.partial_rotary_factor);
  EXPECT_EQ(a.original_max_position_embeddings, b.original_max_position_embeddings);
  EXPECT_EQ(a.beta_fast, b.beta_fast);
  EXPECT_EQ(a.beta_slow, b.beta_slow);
  EXPECT_EQ(a.attention_factor, b.attention_factor);
  EXPECT_EQ(a.mscale, b.mscale);
  EXPECT_EQ(a.mscale_all_dim, b.mscale_all_dim);
  EXPECT_EQ(a.truncate, b.truncate);
  EXPECT_EQ(a.low_freq_factor, b.low_freq_factor);
  EXPECT_EQ(a.high_freq_factor, b.high_freq_factor);
}

// A fixture: a scratch folder per test, and writable copies of the tiny checkpoints in it.
class Loader : public ::testing::Test {
 protected:
  fs::path llama() { return copy_checkpoint(kTinyLlama, tmp_.path() / "tiny-llama"); }
  fs::path arcee() { return copy_checkpoint(kTinyArcee, tmp_.path() / "tiny-arcee"); }
  fs::path scratch() const { return tmp_.path(); }

 private:
  TempDir tmp_;
};

// =============================================================================================
// Positive cases

TEST_F(Loader, TinyArceeShardedCheckpointLoads) {
  auto model = afm::build_model(kTinyArcee.string(), afm::Device::cpu(), kSeqLen);
  const afm::ModelConfig& c = model->config();
  EXPECT_EQ(c.architecture, "ArceeForCausalLM");
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.num_layers, 3);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.hidden_act, "relu2");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.rope.factor, 20.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_EQ(c.rope.beta_fast, 32.0);
  EXPECT_EQ(c.rope.beta_slow, 1.0);
  EXPECT_EQ(model->max_seq_len(), kSeqLen);

  auto checkpoint = afm::Checkpoint::open(kTinyArcee.string());
  EXPECT_EQ(checkpoint.tensors().size(), 3u + 3u * 8u);  // embed, norm, lm_head; 8 per layer (no gate)
  EXPECT_TRUE(checkpoint.contains("lm_head.weight"));
  EXPECT_EQ(checkpoint.get("model.layers.2.self_attn.k_proj.weight").describe(),
            "model.layers.2.self_attn.k_proj.weight [64, 128] BF16");
}

TEST_F(Loader, TinyLlamaSingleFileTiedCheckpointLoads) {
  auto model = afm::build_model(kTinyLlama.string(), afm::Device::cpu(), kSeqLen);
  const afm::ModelConfig& c = model->config();
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 96);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_heads, 6);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 1024);
  EXPECT_FALSE(afm::Checkpoint::open(kTinyLlama.string()).contains("lm_head.weight"));  // tied

  const std::vector<float> logits = prompt_logits(kTinyLlama);
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
}

TEST_F(Loader, EmbeddedAustenModelLoads) {
  auto model = afm::build_model(kAusten.string(), afm::Device::cpu(), kSeqLen);
  EXPECT_EQ(model->config().architecture, "ArceeForCausalLM");
  EXPECT_EQ(model->config().num_layers, 6);
  EXPECT_EQ(model->config().hidden_size, 256);
  EXPECT_EQ(model->max_seq_len(), kSeqLen);
}

TEST_F(Loader, F32AndF16CheckpointsGiveTheLogitsOfTheBf16Original) {
  const std::vector<float> reference = prompt_logits(kTinyLlama);

  const fs::path f32 = copy_checkpoint(kTinyLlama, scratch() / "f32");
  convert_bf16_tensors(f32 / "model.safetensors", "F32");
  EXPECT_EQ(afm::Checkpoint::open(f32.string()).get("model.norm.weight").dtype, afm::DType::F32);
  const std::vector<float> from_f32 = prompt_logits(f32);
  ASSERT_EQ(from_f32.size(), reference.size());
  for (size_t i = 0; i < reference.size(); i++)
    ASSERT_NEAR(from_f32[i], reference[i], 1e-6 * std::max(1.0f, std::fabs(reference[i]))) << "logit " << i;

  const fs::path f16 = copy_checkpoint(kTinyLlama, scratch() / "f16");
  convert_bf16_tensors(f16 / "model.safetensors", "F16");
  EXPECT_EQ(afm::Checkpoint::open(f16.string()).get("model.norm.weight").dtype, afm::DType::F16);
  const std::vector<float> from_f16 = prompt_logits(f16);
  ASSERT_EQ(from_f16.size(), reference.size());
  // bf16 -> f16 is exact in f16's normal range; only tiny weights (f16 subnormals) round.
  for (size_t i = 0; i < reference.size(); i++)
    ASSERT_NEAR(from_f16[i], reference[i], 1e-3 * std::max(1.0f, std::fabs(reference[i]))) << "logit " << i;
}

TEST_F(Loader, TiedModelWithAnExplicitLmHeadUsesIt) {
  // tie_word_embeddings with lm_head.weight present: the lm_head is loaded (and so is not "unexpected").
  const fs::path dir = llama();
  edit_tensors(dir / "model.safetensors", [](TensorMap& t) { t["lm_head.weight"] = t.at("model.embed_tokens.weight"); });
  EXPECT_NO_THROW(afm::build_model(dir.string(), afm::Device::cpu(), kSeqLen));
}

TEST_F(Loader, RotaryInvFreqBufferIsIgnored) {
  const fs::path dir = llama();
  edit_tensors(dir / "model.safetensors", [](TensorMap& t) {
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = RawTensor{"F32", {8}, std::string(32, '\0')};
  });
  EXPECT_NO_THROW(afm::build_model(dir.string(), afm::Device::cpu(), kSeqLen));
}

// =============================================================================================
// Config: v4 and v5 styles, token ids

TEST(Config, V4AndV5StylesGiveTheSameLlama3Rope) {
  // tiny-llama's config is v5 (rope_parameters holds rope_theta); write its v4 twin.
  const json v5 = read_json(kTinyLlama / "config.json");
  json v4 = v5;
  json scaling = v4["rope_parameters"];
  v4.erase("rope_parameters");
  v4["rope_theta"] = scaling["rope_theta"];
  scaling.erase("rope_theta");
  v4["rope_scaling"] = scaling;
  const afm::ModelConfig a = afm::parse_config(v5.dump(), "v5/config.json");
  const afm::ModelConfig b = afm::parse_config(v4.dump(), "v4/config.json");
  EXPECT_EQ(a.rope.type, "llama3");
  EXPECT_EQ(a.rope.theta, 500000.0);
  expect_same_rope(a.rope, b.rope);

  // And the legacy "type" key of old v4 configs.
  json legacy = v4;
  legacy["rope_scaling"].erase("rope_type");
  legacy["rope_scaling"]["type"] = "llama3";
  expect_same_rope(a.rope, afm::parse_config(legacy.dump(), "legacy/config.json").rope);
}

TEST(Config, V4AndV5StylesGiveTheSameYarnRope) {
  // tiny-arcee's config is v4 (rope_theta + rope_scaling); write its v5 twin.
  const json v4 = read_json(kTinyArcee / "config.json");
  json v5 = v4;
  json params = v5["rope_scaling"];
  params["rope_theta"] = v5["rope_theta"];
  v5.erase("rope_scaling");
  v5.erase("rope_theta");
  v5["rope_parameters"] = params;
  const afm::ModelConfig a = afm::parse_config(v4.dump(), "v4/config.json");
  const afm::ModelConfig b = afm::parse_config(v5.dump(), "v5/config.json");
  EXPECT_EQ(a.rope.type, "yarn");
  EXPECT_EQ(a.rope.factor, 20.0);
  expect_same_rope(a.rope, b.rope);
}

TEST(Config, V4AndV5StylesWithoutScaling) {
  json v4 = read_json(kTinyArcee / "config.json");
  v4.erase("rope_scaling");
  v4["rope_theta"] = 250000.0;
  json v5 = v4;
  v5.erase("rope_theta");
  v5["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 250000.0}};
  const afm::ModelConfig a = afm::parse_config(v4.dump(), "v4/config.json");
  const afm::ModelConfig b = afm::parse_config(v5.dump(), "v5/config.json");
  EXPECT_EQ(a.rope.type, "default");
  EXPECT_EQ(a.rope.theta, 250000.0);
  EXPECT_EQ(a.rope.original_max_position_embeddings, 65536);
  expect_same_rope(a.rope, b.rope);
}

TEST(Config, EosTokenIdAsIntAndAsList) {
  json config = read_json(kTinyLlama / "config.json");
  config["eos_token_id"] = 4097;
  EXPECT_EQ(afm::parse_config(config.dump(), "int").eos_token_ids, (std::vector<int32_t>{4097}));
  config["eos_token_id"] = json::array({4097, 4098, 7});
  EXPECT_EQ(afm::parse_config(config.dump(), "list").eos_token_ids, (std::vector<int32_t>{4097, 4098, 7}));
  config["eos_token_id"] = nullptr;
  EXPECT_TRUE(afm::parse_config(config.dump(), "null").eos_token_ids.empty());
  config.erase("eos_token_id");
  EXPECT_TRUE(afm::parse_config(config.dump(), "absent").eos_token_ids.empty());
  config["eos_token_id"] = "4097";
  EXPECT_THAT(config_error(config), HasSubstr("eos_token_id"));
}

TEST(Config, BosTokenIdAndDefaults) {
  json config = read_json(kTinyLlama / "config.json");
  EXPECT_EQ(afm::parse_config(config.dump(), "x").bos_token_id, std::optional<int32_t>(4096));
  config.erase("bos_token_id");
  config.erase("num_key_value_heads");
  config.erase("head_dim");
  const afm::ModelConfig c = afm::parse_config(config.dump(), "x");
  EXPECT_FALSE(c.bos_token_id.has_value());
  EXPECT_EQ(c.num_kv_heads, c.num_heads);        // no GQA unless told
  EXPECT_EQ(c.head_dim, c.hidden_size / c.num_heads);
}

TEST(Config, LoadConfigReadsTheFile) {
  const afm::ModelConfig c = afm::load_config((kTinyArcee / "config.json").string());
  EXPECT_EQ(c.architecture, "ArceeForCausalLM");
  EXPECT_EQ(c.vocab_size, 4104);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{4097}));
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
}

// =============================================================================================
// Missing files

TEST_F(Loader, MissingModelFolder) {
  const fs::path dir = scratch() / "no-such-model";
  const std::string msg = load_error(dir);
  EXPECT_THAT(msg, AllOf(HasSubstr("not found"), HasSubstr("no-such-model")));
  EXPECT_THAT(error_of([&] { afm::Checkpoint::open(dir.string()); }), HasSubstr("no-such-model"));
}

TEST_F(Loader, FolderWithoutConfigJson) {
  const fs::path dir = llama();
  fs::remove(dir / "config.json");
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("config.json"), HasSubstr("tiny-llama")));
}

TEST_F(Loader, FolderWithConfigButNoWeights) {
  const fs::path dir = llama();
  fs::remove(dir / "model.safetensors");
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("model.safetensors.index.json"),
                                     HasSubstr("tiny-llama")));
}

// =============================================================================================
// Broken config.json

TEST_F(Loader, MalformedConfigJson) {
  const fs::path dir = llama();
  write_bytes(dir / "config.json", "{ \"architectures\": [\"LlamaForCausalLM\"], this is not json");
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("config.json"), HasSubstr("malformed JSON")));
}

TEST_F(Loader, ConfigIsNotAnObject) {
  const fs::path dir = llama();
  write_bytes(dir / "config.json", "[1, 2, 3]");
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("config.json"), HasSubstr("object")));
}

TEST_F(Loader, ConfigMissingHiddenSize) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c.erase("hidden_size"); });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("config.json"), HasSubstr("hidden_size"), HasSubstr("missing")));
}

TEST_F(Loader, ConfigKeyOfTheWrongType) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c["num_hidden_layers"] = "two"; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("num_hidden_layers"), HasSubstr("wrong type")));
}

TEST_F(Loader, UnknownArchitecture) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c["architectures"] = json::array({"MistralForCausalLM"}); });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("MistralForCausalLM"), HasSubstr("ArceeForCausalLM"),
                                     HasSubstr("LlamaForCausalLM"), HasSubstr("config.json")));
}

TEST_F(Loader, NoArchitecturesKey) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c.erase("architectures"); });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("architectures"), HasSubstr("config.json")));
  edit_config(dir, [](json& c) { c["architectures"] = json::array(); });
  EXPECT_THAT(load_error(dir), HasSubstr("architectures"));
}

TEST_F(Loader, HeadsNotAMultipleOfKvHeads) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c["num_key_value_heads"] = 4; });  // 6 heads
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("num_attention_heads"), HasSubstr("num_key_value_heads"),
                                     HasSubstr("6"), HasSubstr("4")));
  edit_config(dir, [](json& c) { c["num_key_value_heads"] = 0; });
  EXPECT_THAT(load_error(dir), HasSubstr("num_key_value_heads"));
}

TEST_F(Loader, UnsupportedRopeType) {
  const fs::path dir = llama();  // v5 style
  edit_config(dir, [](json& c) { c["rope_parameters"]["rope_type"] = "dynamic"; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("rope_type"), HasSubstr("dynamic"), HasSubstr("llama3")));

  const fs::path v4 = arcee();  // v4 style
  edit_config(v4, [](json& c) { c["rope_scaling"]["rope_type"] = "longrope"; });
  EXPECT_THAT(load_error(v4), AllOf(HasSubstr("rope_type"), HasSubstr("longrope")));
}

TEST_F(Loader, HiddenActNotMatchingTheFamily) {
  const fs::path dir = arcee();
  edit_config(dir, [](json& c) { c["hidden_act"] = "silu"; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("ArceeForCausalLM"), HasSubstr("hidden_act"), HasSubstr("relu2"),
                                     HasSubstr("silu")));

  const fs::path llama_dir = llama();
  edit_config(llama_dir, [](json& c) { c["hidden_act"] = "gelu"; });
  EXPECT_THAT(load_error(llama_dir), AllOf(HasSubstr("LlamaForCausalLM"), HasSubstr("gelu"), HasSubstr("silu")));
}

TEST_F(Loader, BiasesAreRejected) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c["attention_bias"] = true; });
  EXPECT_THAT(load_error(dir), HasSubstr("attention_bias"));
}

TEST_F(Loader, NegativeMaxSeqLen) {
  EXPECT_THAT(error_of([&] { afm::build_model(kTinyLlama.string(), afm::Device::cpu(), -5); }),
              HasSubstr("max_seq_len"));
}

// A malformed value anywhere in config.json must surface as afm::Error naming the key,
// not as a raw nlohmann::json exception.
TEST(Config, MalformedOptionalRopeValueIsAnAfmError) {
  json config = read_json(kTinyArcee / "config.json");
  config["rope_scaling"]["attention_factor"] = "big";
  EXPECT_THAT(config_error(config), HasSubstr("attention_factor"));
}

TEST(Config, MalformedEosListIsAnAfmError) {
  json config = read_json(kTinyArcee / "config.json");
  config["eos_token_id"] = json::array({"</s>"});
  EXPECT_THAT(config_error(config), HasSubstr("eos_token_id"));
}

// RoPE values the formulas divide by or take logs of: out of range they would give NaN logits.
TEST(Config, RopeValuesThatWouldGiveNaNAreErrors) {
  json config = read_json(kTinyArcee / "config.json");
  config["rope_theta"] = 0;
  EXPECT_THAT(config_error(config), HasSubstr("rope_theta"));
  config = read_json(kTinyArcee / "config.json");
  config["rope_scaling"]["original_max_position_embeddings"] = 0;
  EXPECT_THAT(config_error(config), HasSubstr("original_max_position_embeddings"));
  config = read_json(kTinyLlama / "config.json");
  config["rope_parameters"]["high_freq_factor"] = 1.0;
  EXPECT_THAT(config_error(config), HasSubstr("low_freq_factor < high_freq_factor"));
  config = read_json(kTinyArcee / "config.json");
  config["rms_norm_eps"] = -1e-5;
  EXPECT_THAT(config_error(config), HasSubstr("rms_norm_eps"));
}

// A token id beyond int32 must be rejected, not wrapped onto another token (4294967297 -> 1).
TEST(Config, TokenIdOutOfRangeIsAnAfmError) {
  json config = read_json(kTinyArcee / "config.json");
  config["eos_token_id"] = 4294967297LL;
  EXPECT_THAT(config_error(config), HasSubstr("eos_token_id"));
  config["eos_token_id"] = json::array({4097, 4294967298LL});
  EXPECT_THAT(config_error(config), HasSubstr("eos_token_id"));
  config["eos_token_id"] = 4097;
  config["bos_token_id"] = 4294967297LL;
  EXPECT_THAT(config_error(config), HasSubstr("bos_token_id"));
}

TEST(Config, NonPositiveMaxPositionEmbeddingsIsAnAfmError) {
  json config = read_json(kTinyArcee / "config.json");
  config["max_position_embeddings"] = -5;
  EXPECT_THAT(config_error(config), HasSubstr("max_position_embeddings"));
}

// A hostile config is refused by its size alone, naming the key and the limit, before anything is
// sized from it.
TEST(Config, SizesAboveTheLimitsAreAfmErrors) {
  const std::pair<const char*, int64_t> cases[] = {
      {"num_hidden_layers", 1000000000}, {"hidden_size", int64_t(1) << 40}, {"vocab_size", int64_t(1) << 32},
      {"intermediate_size", int64_t(1) << 40}, {"max_position_embeddings", int64_t(1) << 40}};
  for (const auto& [key, value] : cases) {
    json config = read_json(kTinyLlama / "config.json");
    config[key] = value;
    if (std::string(key) == "hidden_size") config["num_attention_heads"] = config["num_key_value_heads"] = 1;
    EXPECT_THAT(config_error(config), AllOf(HasSubstr(key), HasSubstr(std::to_string(value)), HasSubstr("limit")));
  }
  json config = read_json(kTinyLlama / "config.json");
  config["num_hidden_layers"] = 4096;  // the limit itself is accepted
  EXPECT_EQ(afm::parse_config(config.dump(), "x").num_layers, 4096);
}

// Without head_dim the head size is hidden_size / heads, which must then divide exactly; with
// head_dim (as Qwen3 and Gemma have) heads x head_dim need not be hidden_size.
TEST(Config, HiddenSizeNotAMultipleOfHeadsNeedsAHeadDim) {
  json config = read_json(kTinyLlama / "config.json");  // hidden 96, head_dim 16
  config["num_attention_heads"] = config["num_key_value_heads"] = 7;
  EXPECT_EQ(afm::parse_config(config.dump(), "x").head_dim, 16);
  config.erase("head_dim");
  EXPECT_THAT(config_error(config), AllOf(HasSubstr("hidden_size (96)"), HasSubstr("num_attention_heads (7)"),
                                          HasSubstr("head_dim")));
}

// =============================================================================================
// Broken safetensors files

TEST_F(Loader, TruncatedInTheDataArea) {
  const fs::path dir = llama();
  const fs::path file = dir / "model.safetensors";
  fs::resize_file(file, fs::file_size(file) - 100);  // cuts into model.norm.weight, the last tensor
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("model.norm.weight"),
                                     HasSubstr("truncated")));
}

TEST_F(Loader, TruncatedInsideTheHeader) {
  const fs::path dir = llama();
  const fs::path file = dir / "model.safetensors";
  fs::resize_file(file, 8 + 100);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("truncated")));
}

TEST_F(Loader, FileShorterThanEightBytes) {
  const fs::path dir = llama();
  const fs::path file = dir / "model.safetensors";
  fs::resize_file(file, 5);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("truncated")));
  fs::resize_file(file, 0);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("truncated")));
}

TEST_F(Loader, HeaderLengthLargerThanTheFile) {
  const fs::path dir = llama();
  const fs::path file = dir / "model.safetensors";
  std::string bytes = read_bytes(file);
  const uint64_t size = bytes.size();
  bytes.replace(0, 8, u64_le(size));  // one more byte than there is after the length
  write_bytes(file, bytes);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("truncated"),
                                     HasSubstr(std::to_string(size))));
  bytes.replace(0, 8, u64_le(~uint64_t(0)));  // must not wrap around
  write_bytes(file, bytes);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("truncated")));
}

TEST_F(Loader, MalformedHeaderJson) {
  const fs::path dir = llama();
  const fs::path file = dir / "model.safetensors";
  write_bytes(file, encode_safetensors("{\"model.norm.weight\": {\"dtype\": \"BF16\", ", std::string(192, '\0')));
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("malformed"), HasSubstr("header")));
  write_bytes(file, encode_safetensors("[1,2]", ""));
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("header")));
}

TEST_F(Loader, HeaderEntryMissingAField) {
  const fs::path dir = llama();
  edit_header(dir / "model.safetensors", [](json& h) { h["model.norm.weight"].erase("shape"); });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors"), HasSubstr("model.norm.weight")));
}

TEST_F(Loader, UnsupportedDtype) {
  for (const std::string dtype : {"F8_E4M3", "I8"}) {
    SCOPED_TRACE(dtype);
    TempDir tmp;
    const fs::path dir = copy_checkpoint(kTinyLlama, tmp.path() / "tiny-llama");
    const std::string q = "model.layers.1.self_attn.q_proj.weight";
    edit_tensors(dir / "model.safetensors", [&](TensorMap& t) {
      t[q].dtype = dtype;
      t[q].bytes.resize(t[q].bytes.size() / 2);  // one byte per element, so sizes agree
    });
    EXPECT_THAT(load_error(dir), AllOf(HasSubstr(dtype), HasSubstr(q), HasSubstr("model.safetensors")));
  }
}

TEST_F(Loader, IntegerWeightsAreRejected) {
  // A supported dtype that cannot be a weight.
  const fs::path dir = llama();
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  edit_tensors(dir / "model.safetensors", [&](TensorMap& t) {
    t[q].dtype = "I32";
    t[q].bytes.resize(t[q].bytes.size() * 2);
  });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr(q), HasSubstr("I32")));
}

TEST_F(Loader, DataOffsetsNotMatchingShapeTimesDtype) {
  const fs::path dir = llama();
  const std::string k = "model.layers.0.self_attn.k_proj.weight";
  edit_header(dir / "model.safetensors", [&](json& h) { h[k]["data_offsets"][1] = h[k]["data_offsets"][1].get<uint64_t>() - 2; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr(k), HasSubstr("model.safetensors"), HasSubstr("[32, 96]")));
}

TEST_F(Loader, DataOffsetsReversed) {
  const fs::path dir = llama();
  const std::string k = "model.layers.0.self_attn.k_proj.weight";
  edit_header(dir / "model.safetensors", [&](json& h) {
    auto o = h[k]["data_offsets"];
    h[k]["data_offsets"] = json::array({o[1], o[0]});
  });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr(k), HasSubstr("data_offsets")));
}

TEST_F(Loader, SafetensorsFileGetNamesTheFile) {
  const afm::SafetensorsFile file = afm::SafetensorsFile::open((kTinyLlama / "model.safetensors").string());
  EXPECT_TRUE(file.contains("model.norm.weight"));
  EXPECT_THAT(error_of([&] { file.get("lm_head.weight"); }), AllOf(HasSubstr("model.safetensors"), HasSubstr("lm_head.weight")));
}

// A shape whose element count overflows int64 must not pass the size check by wrapping around
// to the few bytes the file actually holds.
TEST_F(Loader, HugeShapeDoesNotWrapAroundTheSizeCheck) {
  const fs::path file = scratch() / "huge.safetensors";
  // (2^62 + 1) F32 elements: 2^64 + 4 bytes, which wraps to 4 in 64-bit arithmetic.
  const json header = {{"x", {{"dtype", "F32"}, {"shape", json::array({4611686018427387905LL})},
                              {"data_offsets", json::array({0, 4})}}}};
  write_bytes(file, encode_safetensors(header.dump(), std::string(4, '\0')));
  EXPECT_THAT(open_error(file), AllOf(HasSubstr("huge.safetensors"), HasSubstr("x")));

  // [2^32, 2^32] F16: 2^65 bytes, which wraps to 0.
  const json header2 = {{"y", {{"dtype", "F16"}, {"shape", json::array({4294967296LL, 4294967296LL})},
                               {"data_offsets", json::array({0, 0})}}}};
  write_bytes(file, encode_safetensors(header2.dump(), ""));
  EXPECT_THAT(open_error(file), AllOf(HasSubstr("huge.safetensors"), HasSubstr("y")));
}

// Found by fuzz/fuzz_safetensors: a zero dimension makes the byte count 0, so only the element
// count (2^96 here) overflows, and numel() wrapped.
TEST_F(Loader, ZeroDimensionDoesNotHideAnOverflowingElementCount) {
  const fs::path file = scratch() / "zero.safetensors";
  const json header = {{"z", {{"dtype", "F32"}, {"shape", json::array({int64_t(1) << 48, int64_t(1) << 48, 0})},
                              {"data_offsets", json::array({0, 0})}}}};
  write_bytes(file, encode_safetensors(header.dump(), ""));
  EXPECT_THAT(open_error(file), AllOf(HasSubstr("zero.safetensors"), HasSubstr("impossible shape")));
}

// Found by fuzz/fuzz_safetensors: a float in the shape (or the offsets) was converted to an
// integer, which is undefined behaviour out of range; any non-integer is malformed.
TEST_F(Loader, NonIntegerShapeOrOffsetsAreRefused) {
  const fs::path file = scratch() / "float.safetensors";
  for (const json& shape : {json::array({-1.2e21, 8}), json::array({2.0})}) {
    const json header = {{"x", {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", json::array({0, 8})}}}};
    write_bytes(file, encode_safetensors(header.dump(), std::string(8, '\0')));
    EXPECT_THAT(open_error(file), AllOf(HasSubstr("float.safetensors"), HasSubstr("shape"), HasSubstr("not an integer")));
  }
  const json header = {{"x", {{"dtype", "F32"}, {"shape", json::array({2})}, {"data_offsets", json::array({0, 8e20})}}}};
  write_bytes(file, encode_safetensors(header.dump(), std::string(8, '\0')));
  EXPECT_THAT(open_error(file), AllOf(HasSubstr("data_offsets"), HasSubstr("not an integer")));
}

// A header claiming 1 TB of tensors in a small file is refused from the header alone.
TEST_F(Loader, HeaderClaimingATerabyteIsRefused) {
  const fs::path file = scratch() / "terabyte.safetensors";
  const json header = {{"t", {{"dtype", "F32"}, {"shape", json::array({262144, 1048576})},
                              {"data_offsets", json::array({0, int64_t(1) << 40})}}}};
  write_bytes(file, encode_safetensors(header.dump(), std::string(16, '\0')));
  EXPECT_THAT(open_error(file), AllOf(HasSubstr("1099511627776"), HasSubstr("16 data bytes"), HasSubstr("truncated")));
}

TEST_F(Loader, OverlappingTensorsAreRefused) {
  const fs::path file = scratch() / "overlap.safetensors";
  json header = {{"a", {{"dtype", "F32"}, {"shape", json::array({2})}, {"data_offsets", json::array({0, 8})}}},
                 {"b", {{"dtype", "F32"}, {"shape", json::array({2})}, {"data_offsets", json::array({4, 12})}}}};
  write_bytes(file, encode_safetensors(header.dump(), std::string(12, '\0')));
  EXPECT_THAT(open_error(file), AllOf(HasSubstr("overlap.safetensors"), HasSubstr("a and b overlap")));
  header["b"]["data_offsets"] = json::array({8, 16});  // adjacent is fine, and so is an empty tensor anywhere
  header["e"] = {{"dtype", "F32"}, {"shape", json::array({0})}, {"data_offsets", json::array({4, 4})}};
  write_bytes(file, encode_safetensors(header.dump(), std::string(16, '\0')));
  EXPECT_EQ(afm::SafetensorsFile::open(file.string()).tensors().size(), 3u);
}

// =============================================================================================
// Tensors that do not fit the config

TEST_F(Loader, MissingTensor) {
  const fs::path dir = llama();
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  edit_tensors(dir / "model.safetensors", [&](TensorMap& t) { t.erase(q); });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("missing"), HasSubstr(q), HasSubstr("tiny-llama")));
}

TEST_F(Loader, MissingTensorInAShardedCheckpoint) {
  const fs::path dir = arcee();
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  edit_tensors(dir / kShard1, [&](TensorMap& t) { t.erase(q); });
  json index = read_json(dir / "model.safetensors.index.json");
  index["weight_map"].erase(q);
  write_json(dir / "model.safetensors.index.json", index);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("missing"), HasSubstr(q)));
}

TEST_F(Loader, UntiedModelWithoutLmHead) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c["tie_word_embeddings"] = false; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("missing"), HasSubstr("lm_head.weight")));
}

TEST_F(Loader, ExtraUnexpectedTensor) {
  const fs::path dir = llama();
  const std::string extra = "model.layers.0.self_attn.q_norm.weight";
  edit_tensors(dir / "model.safetensors", [&](TensorMap& t) { t[extra] = RawTensor{"BF16", {16}, std::string(32, '\0')}; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("unexpected"), HasSubstr(extra)));
}

TEST_F(Loader, ExtraLayerBeyondNumHiddenLayers) {
  const fs::path dir = llama();
  edit_config(dir, [](json& c) { c["num_hidden_layers"] = 1; });  // the file still holds layer 1
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("unexpected"), HasSubstr("model.layers.1.")));
}

TEST_F(Loader, WrongShape) {
  const fs::path dir = llama();
  const std::string k = "model.layers.0.self_attn.k_proj.weight";
  edit_tensors(dir / "model.safetensors", [&](TensorMap& t) {
    t[k].shape = {16, 96};  // the config implies [2 kv heads * 16, 96] = [32, 96]
    t[k].bytes.resize(16 * 96 * 2);
  });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr(k), HasSubstr("wrong shape"), HasSubstr("[16, 96]"),
                                     HasSubstr("[32, 96]")));
}

TEST_F(Loader, WrongShapeFromTheConfigSide) {
  const fs::path dir = arcee();
  edit_config(dir, [](json& c) { c["intermediate_size"] = 256; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.layers.0.mlp"), HasSubstr("wrong shape"),
                                     HasSubstr("512"), HasSubstr("256")));
}

// =============================================================================================
// Sharded checkpoints

TEST_F(Loader, ShardListedInTheIndexButMissing) {
  const fs::path dir = arcee();
  fs::remove(dir / kShard2);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr(kShard2), HasSubstr("missing"), HasSubstr("index")));
}

TEST_F(Loader, IndexPlacesATensorInTheWrongShard) {
  const fs::path dir = arcee();
  json index = read_json(dir / "model.safetensors.index.json");
  index["weight_map"]["lm_head.weight"] = kShard1;  // it lives in shard 2
  write_json(dir / "model.safetensors.index.json", index);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("lm_head.weight"), HasSubstr(kShard1), HasSubstr(kShard2)));
}

TEST_F(Loader, IndexListsATensorNoShardHolds) {
  const fs::path dir = arcee();
  json index = read_json(dir / "model.safetensors.index.json");
  index["weight_map"]["model.layers.7.self_attn.q_proj.weight"] = kShard2;
  write_json(dir / "model.safetensors.index.json", index);
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.layers.7.self_attn.q_proj.weight"), HasSubstr(kShard2)));
}

TEST_F(Loader, TensorInTwoShards) {
  const fs::path dir = arcee();
  const std::string norm = "model.norm.weight";
  json index = read_json(dir / "model.safetensors.index.json");
  index["weight_map"].erase(norm);  // so the index cannot tell which copy is meant
  write_json(dir / "model.safetensors.index.json", index);
  const RawTensor copy = read_safetensors(dir / kShard2).at(norm);
  edit_tensors(dir / kShard1, [&](TensorMap& t) { t[norm] = copy; });
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr(norm), HasSubstr("more than one shard")));
}

TEST_F(Loader, MalformedIndex) {
  const fs::path dir = arcee();
  write_bytes(dir / "model.safetensors.index.json", "{\"weight_map\": ");
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors.index.json"), HasSubstr("malformed")));
  write_bytes(dir / "model.safetensors.index.json", "{\"metadata\": {}}");
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr("model.safetensors.index.json"), HasSubstr("weight_map")));
}

// Shards live beside the index: a path out of the folder is refused, not read.
TEST_F(Loader, IndexNamingAShardOutsideTheFolder) {
  const fs::path dir = arcee();
  for (const std::string& shard : std::vector<std::string>{"../tiny-arcee/" + std::string(kShard1), "/etc/passwd", ".."}) {
    json index = read_json(dir / "model.safetensors.index.json");
    index["weight_map"]["lm_head.weight"] = shard;
    write_json(dir / "model.safetensors.index.json", index);
    EXPECT_THAT(load_error(dir), AllOf(HasSubstr(shard), HasSubstr("not a file name")));
  }
}

TEST_F(Loader, TruncatedShard) {
  const fs::path dir = arcee();
  fs::resize_file(dir / kShard2, fs::file_size(dir / kShard2) - 100);  // cuts model.norm.weight, the last tensor
  EXPECT_THAT(load_error(dir), AllOf(HasSubstr(kShard2), HasSubstr("truncated"), HasSubstr("model.norm.weight")));
}

}  // namespace
