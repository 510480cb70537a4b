// GGUF files: the container against files that llama.cpp's own writer (the gguf package) wrote,
// HF fixtures converted in llama.cpp's layout against their HF references, and hostile files.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "error.h"
#include "eval.h"
#include "gguf.h"
#include "gguf_model.h"
#include "model.h"
#include "model_files.h"
#include "rope.h"
#include "support/subprocess.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;
const std::string kFixtures = std::string(AFM_SOURCE_DIR) + "/tests/fixtures";

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string write_bytes(const std::string& name, const std::string& bytes) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

// Writes a file with gguf_write.py once per test binary run and returns its path.
// Written under a name of this process's own and renamed into place, sidecars first: CTest runs
// tests that share a file in parallel, and one must never map a file another is still writing.
std::string oracle_file(const std::string& args, const std::string& name) {
  const std::string path = ::testing::TempDir() + "/" + name;
  if (!fs::exists(path)) {
    const std::string partial = path + ".partial-" + std::to_string(getpid());
    const auto run = afm::test::run_oracle("gguf_write.py " + args + " " + partial);
    EXPECT_EQ(run.status, 0) << "gguf_write.py " << args << " failed (is .venv installed? scripts/install-deps.sh)";
    for (const char* sidecar : {".json", ".f32"})
      if (fs::exists(partial + sidecar)) fs::rename(partial + sidecar, path + sidecar);
    if (fs::exists(partial)) fs::rename(partial, path);
  }
  return path;
}

const std::string& all_types_file() {
  static const std::string path = oracle_file("all-types", "all-types.gguf");
  return path;
}

TEST(Gguf, MetadataOfEveryTypeReadsAsTheWriterWroteIt) {
  const afm::GGUFFile file = afm::GGUFFile::open(all_types_file());
  const json expected = json::parse(read_bytes(all_types_file() + ".json"))["metadata"];
  EXPECT_EQ(file.version(), 3u);
  for (const char* key : {"test.u8", "test.i8", "test.u16", "test.i16", "test.u32", "test.i32", "test.u64", "test.i64"})
    EXPECT_EQ(file.integer(key), expected[key].get<int64_t>()) << key;
  EXPECT_EQ(file.number("test.f32"), expected["test.f32"].get<double>());
  EXPECT_EQ(file.number("test.f64"), 0.1);
  EXPECT_EQ(file.boolean("test.true"), true);
  EXPECT_EQ(file.boolean("test.false"), false);
  EXPECT_EQ(file.string("test.string"), expected["test.string"].get<std::string>());
  const auto strings = file.strings("test.strings");
  EXPECT_EQ(std::vector<std::string>(strings.begin(), strings.end()), expected["test.strings"].get<std::vector<std::string>>());
  EXPECT_EQ(file.integers("test.ints"), (std::vector<int64_t>{1, -2, 3}));
  const auto& nested = std::get<std::vector<afm::GGUFValue>>(file.metadata().at("test.nested").value);
  ASSERT_EQ(nested.size(), 2u);
  EXPECT_EQ(std::get<std::vector<afm::GGUFValue>>(nested[0].value).size(), 2u);
  EXPECT_EQ(file.string("general.architecture"), "llama");
  EXPECT_EQ(file.integer("absent"), std::nullopt);
  EXPECT_THAT([&] { file.string("test.u8"); }, ::testing::ThrowsMessage<afm::Error>(HasSubstr("test.u8 should be a string")));
}

TEST(Gguf, TensorsOfEveryTypeDequantizeAsGgufDoes) {
  const afm::GGUFFile file = afm::GGUFFile::open(all_types_file());
  const json tensors = json::parse(read_bytes(all_types_file() + ".json"))["tensors"];
  const std::string expected = read_bytes(all_types_file() + ".f32");
  ASSERT_EQ(file.tensors().size(), tensors.size());
  size_t offset = 0;
  for (size_t i = 0; i < tensors.size(); i++) {
    const afm::TensorView& t = file.tensors()[i];
    EXPECT_EQ(t.name, tensors[i]["name"].get<std::string>());
    EXPECT_EQ(afm::dtype_name(t.dtype), tensors[i]["type"].get<std::string>());
    EXPECT_EQ(t.shape, tensors[i]["shape"].get<std::vector<int64_t>>());
    const std::vector<float> values = t.to_f32();
    ASSERT_LE(offset + values.size() * 4, expected.size());
    EXPECT_EQ(std::memcmp(values.data(), expected.data() + offset, values.size() * 4), 0) << t.name;
    offset += values.size() * 4;
  }
  EXPECT_EQ(offset, expected.size());
}

TEST(Gguf, Version2ReadsLikeVersion3) {
  std::string bytes = read_bytes(all_types_file());
  bytes[4] = 2;  // v2 and v3 share the little-endian layout
  const afm::GGUFFile file = afm::GGUFFile::open(write_bytes("v2.gguf", bytes));
  EXPECT_EQ(file.version(), 2u);
  EXPECT_EQ(file.tensors().size(), afm::GGUFFile::open(all_types_file()).tensors().size());
}

// The HF fixtures, converted as llama.cpp's converter lays them out (q/k rows permuted, Llama 3
// scaling as rope_freqs, YaRN as metadata), give the logits of HF's reference.
void expect_matches_hf_reference(const std::string& fixture) {
  const std::string gguf = oracle_file("from-hf " + kFixtures + "/" + fixture, fixture + ".gguf");
  afm::ModelOptions options;
  options.max_seq_len = 512;
  auto model = afm::build_model(gguf, options);
  const afm::EvalResult r = afm::teacher_forcing_eval(*model, afm::load_reference(kFixtures + "/" + fixture + "/reference.safetensors"), true);
  EXPECT_EQ(r.top1, 1.0);
  EXPECT_LE(r.prefill_max_rel_err, 1e-5);
  EXPECT_LE(r.decode_max_rel_err, 1e-5);
  for (double e : r.prompts[0].layer_max_rel_err) EXPECT_LE(e, 1e-5);
}

TEST(Gguf, LlamaWithLlama3RopeAndTiedEmbeddingsMatchesHf) { expect_matches_hf_reference("tiny-llama"); }
TEST(Gguf, ArceeWithYarnMatchesHf) { expect_matches_hf_reference("tiny-arcee"); }

TEST(Gguf, AFileIsKnownByItsMagicWhateverItsName) {
  const std::string renamed = ::testing::TempDir() + "/tiny-llama-without-extension";
  fs::copy_file(oracle_file("from-hf " + kFixtures + "/tiny-llama", "tiny-llama.gguf"), renamed,
                fs::copy_options::overwrite_existing);
  EXPECT_TRUE(afm::is_gguf_path(renamed));
  EXPECT_EQ(afm::build_model(renamed)->config().architecture, "LlamaForCausalLM");
  EXPECT_FALSE(afm::is_gguf_path(kFixtures + "/tiny-llama"));
  EXPECT_FALSE(afm::is_gguf_path(kFixtures + "/tiny-llama/config.json"));
}

TEST(Gguf, ConfigComesFromTheMetadata) {
  const afm::GGUFFile file = afm::GGUFFile::open(oracle_file("from-hf " + kFixtures + "/tiny-arcee", "tiny-arcee.gguf"));
  const afm::ModelConfig c = afm::gguf_model_config(file);
  const afm::ModelConfig hf = afm::load_config(kFixtures + "/tiny-arcee/config.json");
  EXPECT_EQ(c.architecture, hf.architecture);
  EXPECT_EQ(c.hidden_act, "relu2");
  EXPECT_EQ(c.num_layers, hf.num_layers);
  EXPECT_EQ(c.num_kv_heads, hf.num_kv_heads);
  EXPECT_EQ(c.head_dim, hf.head_dim);
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_EQ(c.rope.factor, hf.rope.factor);
  EXPECT_EQ(c.rope.original_max_position_embeddings, hf.rope.original_max_position_embeddings);
  EXPECT_EQ(c.tie_word_embeddings, false);
  EXPECT_EQ(c.eos_token_ids, hf.eos_token_ids);
}

// llama.cpp's own arcee loader ignores YaRN's betas; afm reads them (and the attention factor), so
// a GGUF gives the RoPE of the HF config it came from even with non-default values.
TEST(Gguf, YarnBetasAndAttentionFactorAreHonoured) {
  const fs::path dir = fs::path(::testing::TempDir()) / "arcee-betas";
  fs::create_directories(dir);
  json config = json::parse(read_bytes(kFixtures + "/tiny-arcee/config.json"));
  config["rope_scaling"]["beta_fast"] = 16.0;
  config["rope_scaling"]["beta_slow"] = 2.0;
  config["rope_scaling"]["attention_factor"] = 1.5;
  std::ofstream(dir / "config.json") << config.dump();
  for (const char* name : {"tokenizer.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"})
    fs::copy_file(kFixtures + "/tiny-arcee/" + name, dir / name, fs::copy_options::overwrite_existing);
  const std::string gguf = ::testing::TempDir() + "/arcee-betas.gguf";
  ASSERT_EQ(afm::test::run_oracle("gguf_write.py from-hf " + dir.string() + " " + gguf).status, 0);

  const afm::RopeConfig from_gguf = afm::gguf_model_config(afm::GGUFFile::open(gguf)).rope;
  const afm::RopeConfig from_hf = afm::load_config((dir / "config.json").string()).rope;
  EXPECT_EQ(from_gguf.beta_fast, 16.0);
  EXPECT_EQ(from_gguf.beta_slow, 2.0);
  const afm::RopeFrequencies a = afm::rope_frequencies(from_gguf, 32), b = afm::rope_frequencies(from_hf, 32);
  EXPECT_EQ(a.inv_freq, b.inv_freq);
  EXPECT_EQ(a.attention_scaling, 1.5f);
  EXPECT_EQ(a.attention_scaling, b.attention_scaling);
  EXPECT_NE(a.inv_freq, afm::rope_frequencies(afm::load_config(kFixtures + "/tiny-arcee/config.json").rope, 32).inv_freq);
}

// ---------------------------------------------------------------------------------------------
// Hostile and malformed files, built byte by byte: one F32 tensor of 32 values and two keys.

struct TinyGguf {
  std::string bytes;
  size_t version_at, tensor_count_at, kv_count_at, arch_length_at, tensor_type_at, tensor_offset_at, data_at;

  void u32(uint32_t v) { bytes.append(reinterpret_cast<const char*>(&v), 4); }
  void u64(uint64_t v) { bytes.append(reinterpret_cast<const char*>(&v), 8); }
  void str(const std::string& s) { u64(s.size()), bytes += s; }

  TinyGguf() {
    bytes = "GGUF";
    version_at = bytes.size(), u32(3);
    tensor_count_at = bytes.size(), u64(1);
    kv_count_at = bytes.size(), u64(2);
    str("general.architecture"), u32(8);
    arch_length_at = bytes.size(), str("llama");
    str("general.alignment"), u32(4), u32(32);
    str("t"), u32(1), u64(32);
    tensor_type_at = bytes.size(), u32(0);
    tensor_offset_at = bytes.size(), u64(0);
    bytes.resize((bytes.size() + 31) / 32 * 32, '\0');
    data_at = bytes.size();
    bytes.append(32 * 4, '\0');
  }
  void patch_u32(size_t at, uint32_t v) { std::memcpy(&bytes[at], &v, 4); }
  void patch_u64(size_t at, uint64_t v) { std::memcpy(&bytes[at], &v, 8); }
};

void expect_refused(const std::string& bytes, const std::string& message) {
  const std::string path = write_bytes("hostile.gguf", bytes);
  EXPECT_THAT([&] { afm::GGUFFile::open(path); }, ::testing::ThrowsMessage<afm::Error>(HasSubstr(message)));
}

TEST(GgufHostile, TheTinyFileItselfIsValid) {
  const afm::GGUFFile file = afm::GGUFFile::open(write_bytes("tiny.gguf", TinyGguf().bytes));
  ASSERT_EQ(file.tensors().size(), 1u);
  EXPECT_EQ(file.tensors()[0].shape, std::vector<int64_t>{32});
}

TEST(GgufHostile, EveryTruncationIsAClearError) {
  const std::string whole = TinyGguf().bytes;
  for (size_t n = 0; n < whole.size(); n++) {
    const std::string path = write_bytes("truncated.gguf", whole.substr(0, n));
    EXPECT_THROW(afm::GGUFFile::open(path), afm::Error) << n << " bytes";
  }
  expect_refused(whole.substr(0, 12), "truncated file: it ends inside tensors");
  expect_refused(whole.substr(0, whole.size() - 1), "ends past the end of the file");
}

TEST(GgufHostile, BadMagicAndVersions) {
  TinyGguf g;
  g.bytes[0] = 'X';
  expect_refused(g.bytes, "not a GGUF file");
  g = TinyGguf();
  g.patch_u32(g.version_at, 1);
  expect_refused(g.bytes, "unsupported GGUF version 1");
  g.patch_u32(g.version_at, __builtin_bswap32(3));
  expect_refused(g.bytes, "big-endian");
  expect_refused("", "not a GGUF file");
}

TEST(GgufHostile, CountsLargerThanTheFileAreRefusedBeforeAllocating) {
  TinyGguf g;
  g.patch_u64(g.tensor_count_at, 1000000000000ull);
  expect_refused(g.bytes, "claims 1000000000000 tensors");
  g = TinyGguf();
  g.patch_u64(g.kv_count_at, ~0ull);
  expect_refused(g.bytes, "metadata entries");
}

// Found by fuzz/fuzz_gguf: 2^61 F32 values make a row of 2^63 bytes, which overflowed before
// the product of the other dimensions was checked.
TEST(GgufHostile, ARowTooLongForInt64IsRefused) {
  TinyGguf g;
  g.patch_u64(g.tensor_type_at - 8, uint64_t(1) << 61);  // the tensor's only dimension
  expect_refused(g.bytes, "impossible size");
}

// Each parsed metadata value takes ~40 bytes: a file of 10M one-byte values would take 400 MB.
TEST(GgufHostile, MetadataArraysTooLargeInAllAreRefused) {
  TinyGguf g;
  g.bytes = "GGUF";
  g.u32(3), g.u64(0), g.u64(1);  // version, no tensors, one metadata entry
  const uint64_t n = 10'000'000;
  g.str("big"), g.u32(9), g.u32(0), g.u64(n);  // an array of n u8s
  g.bytes.append(n, '\1');
  expect_refused(g.bytes, "more than 8388608 metadata values in all");
}

TEST(GgufHostile, AStringLongerThanTheFile) {
  TinyGguf g;
  g.patch_u64(g.arch_length_at, 1ull << 40);
  expect_refused(g.bytes, "past the end of the file");
}

TEST(GgufHostile, UnknownTensorTypeAndBadOffsets) {
  TinyGguf g;
  g.patch_u32(g.tensor_type_at, 99);
  expect_refused(g.bytes, "ggml type 99");
  g = TinyGguf();
  g.patch_u32(g.tensor_type_at, 8);  // Q8_0: 32 values are one block of 34 bytes, so it fits
  EXPECT_NO_THROW(afm::GGUFFile::open(write_bytes("q8.gguf", g.bytes)));
  g.patch_u32(g.tensor_type_at, 12);  // Q4_K needs rows of 256
  expect_refused(g.bytes, "not whole Q4_K blocks");
  g = TinyGguf();
  g.patch_u64(g.tensor_offset_at, 4);
  expect_refused(g.bytes, "not aligned");
  g.patch_u64(g.tensor_offset_at, 1ull << 62);
  expect_refused(g.bytes, "past the end of the file");
}

// A llama GGUF of u64 metadata values only, for the checks of the config derived from it.
std::string metadata_gguf(const std::vector<std::pair<std::string, uint64_t>>& keys) {
  TinyGguf g;
  g.bytes = "GGUF";
  g.u32(3), g.u64(0), g.u64(keys.size() + 1);
  g.str("general.architecture"), g.u32(8), g.str("llama");
  for (const auto& [key, value] : keys) g.str(key), g.u32(10), g.u64(value);
  return g.bytes;
}

std::string config_error(const std::vector<std::pair<std::string, uint64_t>>& keys) {
  const std::string path = write_bytes("config.gguf", metadata_gguf(keys));
  try {
    afm::gguf_model_config(afm::GGUFFile::open(path));
  } catch (const afm::Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(GgufHostile, ConfigSizesAboveTheLimitsAreRefused) {
  std::vector<std::pair<std::string, uint64_t>> keys = {
      {"llama.embedding_length", 64}, {"llama.feed_forward_length", 128}, {"llama.block_count", 2},
      {"llama.attention.head_count", 4}, {"llama.vocab_size", 100}};
  EXPECT_EQ(config_error(keys), "(no error)");
  keys[2].second = 1000000000;
  EXPECT_THAT(config_error(keys), AllOf(HasSubstr("num_hidden_layers"), HasSubstr("1000000000"), HasSubstr("limit of 4096")));
  keys[2].second = 2;
  keys[4].second = uint64_t(1) << 40;
  EXPECT_THAT(config_error(keys), AllOf(HasSubstr("vocab_size"), HasSubstr("limit")));
  keys[4].second = 100;
  keys[3].second = 5;  // 64 is no multiple of 5, and there is no attention.key_length
  EXPECT_THAT(config_error(keys), AllOf(HasSubstr("embedding_length (64)"), HasSubstr("head_count (5)")));
  keys[3].second = 4;
  keys.emplace_back("tokenizer.ggml.bos_token_id", uint64_t(1) << 32);  // an int32 in the engine
  EXPECT_THAT(config_error(keys), AllOf(HasSubstr("bos_token_id"), HasSubstr("out of range")));
}

TEST(GgufHostile, UnsupportedArchitectureAndTokenizer) {
  TinyGguf g;
  g.patch_u64(g.arch_length_at, 5);
  std::memcpy(&g.bytes[g.arch_length_at + 8], "qwen2", 5);
  const std::string path = write_bytes("qwen2.gguf", g.bytes);
  EXPECT_THAT([&] { afm::build_model(path); },
              ::testing::ThrowsMessage<afm::Error>(HasSubstr("GGUF architecture \"qwen2\" is not supported")));
  EXPECT_THAT([&] { afm::load_model_tokenizer(write_bytes("tok.gguf", TinyGguf().bytes)); },
              ::testing::ThrowsMessage<afm::Error>(HasSubstr("has no tokenizer")));
  EXPECT_THAT([&] { afm::build_model(::testing::TempDir() + "/missing.gguf"); },
              ::testing::ThrowsMessage<afm::Error>(HasSubstr("missing.gguf")));
}

}  // namespace
