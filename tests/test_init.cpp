// afm init as a user runs it, on AFM-4.5B's config scaled down: the folder afm's own strict loader
// accepts, the index and shards read back with the test's independent safetensors reader, the
// statistics of HF's initializer, seeded bytes, and the error messages.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "model.h"
#include "support/checkpoint_writer.h"
#include "support/subprocess.h"

namespace {

using ::testing::HasSubstr;
using afm_test::json;
using afm_test::TempDir;
namespace fs = std::filesystem;

const std::string kRepo = AFM_SOURCE_DIR;

// afm with stdout and stderr together.
afm::test::Result afm_run(const std::string& args) {
  return afm::test::run_command(std::string(AFM_BINARY) + " " + args + " 2>&1 < /dev/null");
}

// AFM-4.5B's config (ArceeForCausalLM, relu2, YaRN x20, grouped KV heads) with every size cut down, so
// the checkpoint is about 0.5 MB.
json small_afm_config() {
  json c = afm_test::read_json(kRepo + "/tests/fixtures/afm-4.5b-config.json");
  c["hidden_size"] = 64;
  c["intermediate_size"] = 256;
  c["num_hidden_layers"] = 3;
  c["num_attention_heads"] = 4;
  c["num_key_value_heads"] = 2;
  c["head_dim"] = 16;
  c["vocab_size"] = 1000;
  return c;
}

// The names and shapes of load_weights in src/models/decoder.cpp, written out independently.
std::map<std::string, std::vector<int64_t>> expected_tensors(const json& c) {
  const int64_t hidden = c["hidden_size"], ffn = c["intermediate_size"], vocab = c["vocab_size"];
  const int64_t q = int64_t(c["num_attention_heads"]) * int64_t(c["head_dim"]);
  const int64_t kv = int64_t(c["num_key_value_heads"]) * int64_t(c["head_dim"]);
  std::map<std::string, std::vector<int64_t>> t = {{"model.embed_tokens.weight", {vocab, hidden}},
                                                   {"model.norm.weight", {hidden}}};
  if (!c["tie_word_embeddings"].get<bool>()) t["lm_head.weight"] = {vocab, hidden};
  for (int i = 0; i < int(c["num_hidden_layers"]); i++) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    t[p + "input_layernorm.weight"] = {hidden};
    t[p + "post_attention_layernorm.weight"] = {hidden};
    t[p + "self_attn.q_proj.weight"] = {q, hidden};
    t[p + "self_attn.k_proj.weight"] = {kv, hidden};
    t[p + "self_attn.v_proj.weight"] = {kv, hidden};
    t[p + "self_attn.o_proj.weight"] = {hidden, q};
    if (c["hidden_act"] == "silu") t[p + "mlp.gate_proj.weight"] = {ffn, hidden};
    t[p + "mlp.up_proj.weight"] = {ffn, hidden};
    t[p + "mlp.down_proj.weight"] = {hidden, ffn};
  }
  return t;
}

// Every tensor of a checkpoint folder, through the test's own reader (not afm's).
afm_test::TensorMap read_all_tensors(const fs::path& dir) {
  afm_test::TensorMap all;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().extension() == ".safetensors") all.merge(afm_test::read_safetensors(entry.path()));
  return all;
}

std::vector<float> values_of(const afm_test::RawTensor& t) {
  std::vector<float> v;
  for (size_t i = 0; i < t.bytes.size(); i += 2) {
    uint16_t h;
    std::memcpy(&h, t.bytes.data() + i, 2);
    v.push_back(t.dtype == "BF16" ? afm_test::bf16_to_f32(h) : afm::f16_to_f32(h));
  }
  return v;
}

std::set<std::string> file_names(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.insert(entry.path().filename().string());
  return names;
}

// A scratch folder with the small config written to config.json, and `out` to init into.
struct InitCase {
  TempDir tmp{"afm_init_"};
  json config = small_afm_config();
  fs::path config_path = tmp.path() / "small-afm.json";
  fs::path out = tmp.path() / "ckpt";
  InitCase() { afm_test::write_json(config_path, config); }
  afm::test::Result init(const std::string& extra, const fs::path& to) const {
    return afm_run("init --config " + config_path.string() + " --random --out " + to.string() + " " + extra);
  }
  afm::test::Result init(const std::string& extra = "--shard-size 200KB") const { return init(extra, out); }
};

TEST(Init, WritesShardsThatAfmsLoaderAccepts) {
  InitCase c;
  const auto run = c.init();
  ASSERT_EQ(run.status, 0) << run.out;
  EXPECT_THAT(run.out, HasSubstr("in 3 shards"));
  EXPECT_EQ(file_names(c.out), (std::set<std::string>{"config.json", "model.safetensors.index.json",
                                                       "model-00001-of-00003.safetensors",
                                                       "model-00002-of-00003.safetensors",
                                                       "model-00003-of-00003.safetensors"}));
  EXPECT_EQ(afm_test::read_bytes(c.out / "config.json"), afm_test::read_bytes(c.config_path));
  // Nothing left beside it: the partial folder was renamed.
  EXPECT_EQ(file_names(c.tmp.path()), (std::set<std::string>{"ckpt", "small-afm.json"}));

  // afm's loader checks the index against the shards, every shape against the config, and that
  // no tensor is left unused.
  afm::ModelOptions options;
  options.max_seq_len = 16;
  auto model = afm::build_model(c.out.string(), options);
  auto cache = model->new_cache();
  const std::vector<int32_t> tokens = {1, 500, 999}, positions = {0, 1, 2};
  afm::Tensor logits = model->forward(tokens, positions, *cache);
  ASSERT_EQ(logits.cols, 1000);
  for (int64_t i = 0; i < logits.rows * logits.cols; i++) ASSERT_TRUE(std::isfinite(logits.data[i]));
}

TEST(Init, IndexAgreesWithTheShards) {
  InitCase c;
  ASSERT_EQ(c.init().status, 0);
  const json index = afm_test::read_json(c.out / "model.safetensors.index.json");
  const auto expected = expected_tensors(c.config);
  uint64_t total = 0;
  std::set<std::string> listed;
  for (const auto& [name, shard] : index["weight_map"].items()) {
    listed.insert(name);
    const auto tensors = afm_test::read_safetensors(c.out / shard.get<std::string>());
    ASSERT_TRUE(tensors.count(name)) << name << " is not in " << shard;
    EXPECT_EQ(tensors.at(name).shape, expected.at(name)) << name;
    EXPECT_EQ(tensors.at(name).dtype, "BF16");
    total += tensors.at(name).bytes.size();
  }
  std::set<std::string> names;
  for (const auto& [name, shape] : expected) names.insert(name);
  EXPECT_EQ(listed, names);
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  EXPECT_EQ(read_all_tensors(c.out).size(), names.size());  // no tensor stored twice or unlisted

  // Each shard stays under --shard-size unless it holds a single larger tensor; the data area
  // starts 8-byte aligned, as the safetensors library writes it.
  for (int i = 1; i <= 3; i++) {
    const fs::path shard = c.out / ("model-0000" + std::to_string(i) + "-of-00003.safetensors");
    const auto tensors = afm_test::read_safetensors(shard);
    uint64_t bytes = 0;
    for (const auto& [name, t] : tensors) bytes += t.bytes.size();
    EXPECT_TRUE(bytes <= 200000 || tensors.size() == 1) << shard;
    const std::string file = afm_test::read_bytes(shard);
    uint64_t header = 0;
    std::memcpy(&header, file.data(), 8);
    EXPECT_EQ(header % 8, 0u);
    EXPECT_EQ(file.size(), 8 + header + bytes);  // packed: no gaps, nothing after the last tensor
  }
}

TEST(Init, StatisticsAreHfsInitializer) {
  InitCase c;
  ASSERT_EQ(c.init().status, 0);
  for (const auto& [name, t] : read_all_tensors(c.out)) {
    const std::vector<float> v = values_of(t);
    if (t.shape.size() == 1) {
      for (float x : v) ASSERT_EQ(x, 1.0f) << name;
      continue;
    }
    // N(0, 0.02^2): the sample mean has spread 0.02/sqrt(n), the sample std 0.02/sqrt(2n), and the
    // share within one std is 68.27% with spread sqrt(p(1-p)/n); 5 of those is the tolerance.
    const double n = double(v.size());
    double sum = 0, squares = 0, within = 0;
    for (float x : v) {
      sum += x;
      squares += double(x) * x;
      within += std::fabs(x) < 0.02f;
    }
    const double mean = sum / n, std = std::sqrt(squares / n - mean * mean);
    EXPECT_NEAR(mean, 0.0, 5 * 0.02 / std::sqrt(n)) << name;
    EXPECT_NEAR(std, 0.02, 5 * 0.02 / std::sqrt(2 * n)) << name;
    EXPECT_NEAR(within / n, 0.6827, 5 * std::sqrt(0.6827 * 0.3173 / n)) << name << ": not a normal distribution";
  }
}

TEST(Init, TheSeedDeterminesTheBytes) {
  InitCase c;
  ASSERT_EQ(c.init("--shard-size 200KB --seed 5", c.tmp.path() / "a").status, 0);
  ASSERT_EQ(c.init("--shard-size 200KB --seed 5", c.tmp.path() / "b").status, 0);
  ASSERT_EQ(c.init("--shard-size 200KB --seed 6", c.tmp.path() / "c").status, 0);
  for (const std::string& file : file_names(c.tmp.path() / "a")) {
    const std::string a = afm_test::read_bytes(c.tmp.path() / "a" / file);
    EXPECT_EQ(a, afm_test::read_bytes(c.tmp.path() / "b" / file)) << file;
  }
  const auto a = read_all_tensors(c.tmp.path() / "a"), other = read_all_tensors(c.tmp.path() / "c");
  for (const auto& [name, t] : a) {
    if (t.shape.size() == 1) EXPECT_EQ(t.bytes, other.at(name).bytes) << name;  // ones
    else EXPECT_NE(t.bytes, other.at(name).bytes) << name;
  }
  // Every tensor has values of its own, not a copy of another's.
  EXPECT_NE(a.at("model.layers.0.self_attn.k_proj.weight").bytes, a.at("model.layers.0.self_attn.v_proj.weight").bytes);
}

TEST(Init, OtherDtypesRoundTheSameValues) {
  InitCase c;
  ASSERT_EQ(c.init("--dtype f32", c.tmp.path() / "f32").status, 0);
  ASSERT_EQ(c.init("--dtype bf16", c.tmp.path() / "bf16").status, 0);
  ASSERT_EQ(c.init("--dtype f16", c.tmp.path() / "f16").status, 0);
  const auto f32 = afm_test::read_safetensors(c.tmp.path() / "f32" / "model.safetensors");
  const auto bf16 = afm_test::read_safetensors(c.tmp.path() / "bf16" / "model.safetensors");
  const auto f16 = afm_test::read_safetensors(c.tmp.path() / "f16" / "model.safetensors");
  for (const auto& [name, t] : f32) {
    ASSERT_EQ(t.dtype, "F32");
    ASSERT_EQ(f16.at(name).dtype, "F16");
    const std::vector<float> halves = values_of(f16.at(name)), bfloats = values_of(bf16.at(name));
    for (size_t i = 0; i < t.bytes.size() / 4; i++) {
      float x;
      std::memcpy(&x, t.bytes.data() + 4 * i, 4);
      ASSERT_EQ(afm_test::bf16_to_f32(afm_test::f32_to_bf16(x)), bfloats[i]) << name << " [" << i << "]";
      ASSERT_EQ(afm::f16_to_f32(afm_test::f32_to_f16_bits(x)), halves[i]) << name << " [" << i << "]";
    }
  }
  for (const char* dtype : {"f32", "f16"}) EXPECT_NO_THROW(afm::build_model((c.tmp.path() / dtype).string())) << dtype;
}

TEST(Init, TiedLlamaFitsOneShardLikeHf) {
  // A tied, gated (SwiGLU) Llama under the default 5GB limit: one model.safetensors and no index,
  // as transformers saves it; the tied lm_head is not stored.
  TempDir tmp("afm_init_");
  const fs::path out = tmp.path() / "llama";
  const auto run = afm_run("init --config " + kRepo + "/tests/fixtures/tiny-llama/config.json --random --out " +
                           out.string());
  ASSERT_EQ(run.status, 0) << run.out;
  EXPECT_EQ(file_names(out), (std::set<std::string>{"config.json", "model.safetensors"}));
  const auto tensors = afm_test::read_safetensors(out / "model.safetensors");
  EXPECT_TRUE(tensors.count("model.layers.1.mlp.gate_proj.weight"));
  EXPECT_FALSE(tensors.count("lm_head.weight"));
  EXPECT_EQ(tensors.size(), expected_tensors(afm_test::read_json(out / "config.json")).size());
  EXPECT_NO_THROW(afm::build_model(out.string()));
}

TEST(Init, RejectsBadInput) {
  InitCase c;
  auto expect_error = [&](const afm::test::Result& run, const std::string& message) {
    EXPECT_NE(run.status, 0) << run.out;
    EXPECT_THAT(run.out, HasSubstr(message));
  };
  const std::string out = " --random --out " + c.out.string();
  expect_error(afm_run("init --config /nonexistent/config.json" + out), "config not found: /nonexistent/config.json");
  afm_test::write_bytes(c.tmp.path() / "bad.json", "{\"hidden_size\": ");
  expect_error(afm_run("init --config " + (c.tmp.path() / "bad.json").string() + out), "malformed JSON");
  json unknown = c.config;
  unknown["architectures"] = {"MistralForCausalLM"};
  afm_test::write_json(c.tmp.path() / "mistral.json", unknown);
  expect_error(afm_run("init --config " + (c.tmp.path() / "mistral.json").string() + out),
               "unknown architecture \"MistralForCausalLM\"");
  json missing = c.config;
  missing.erase("hidden_size");
  afm_test::write_json(c.tmp.path() / "missing.json", missing);
  expect_error(afm_run("init --config " + (c.tmp.path() / "missing.json").string() + out), "\"hidden_size\"");
  expect_error(c.init("--dtype q8"), "unknown --dtype \"q8\"");
  expect_error(c.init("--shard-size 5XB"), "bad size \"5XB\"");
  expect_error(afm_run("init --config " + c.config_path.string() + " --out " + c.out.string()), "--random");
  EXPECT_FALSE(fs::exists(c.out));

  // A parent that is a file: nothing can be created there.
  afm_test::write_bytes(c.tmp.path() / "file", "x");
  expect_error(c.init("", c.tmp.path() / "file" / "ckpt"), "cannot create");
  expect_error(c.init("", c.tmp.path() / "file"), "exists and is not a folder");

  // A non-empty folder is kept unless --force, which replaces it whole.
  fs::create_directory(c.out);
  afm_test::write_bytes(c.out / "notes.txt", "mine");
  expect_error(c.init(), "is not empty (--force replaces it)");
  EXPECT_EQ(file_names(c.out), std::set<std::string>{"notes.txt"});
  ASSERT_EQ(c.init("--shard-size 200KB --force").status, 0);
  EXPECT_FALSE(fs::exists(c.out / "notes.txt"));
  EXPECT_TRUE(fs::exists(c.out / "model.safetensors.index.json"));
  // An empty folder is simply filled, named with a trailing slash or not.
  fs::create_directory(c.tmp.path() / "empty");
  EXPECT_EQ(c.init("", c.tmp.path() / "empty" / "").status, 0);
  EXPECT_TRUE(fs::exists(c.tmp.path() / "empty" / "model.safetensors"));
}

}  // namespace
