// afm convert: a folder of packed bfp8/bfp4 weights must load without conversion (the weights
// are views of the mapped file) and give exactly the logits of converting at load.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <numeric>

#include "error.h"
#include "model.h"
#include "support/subprocess.h"

namespace {

namespace fs = std::filesystem;
const std::string kFixtures = std::string(AFM_SOURCE_DIR) + "/tests/fixtures";

std::string convert(const std::string& fixture, const std::string& weights, const std::string& extra = "") {
  const std::string out = ::testing::TempDir() + "/converted-" + fixture + "-" + weights;
  fs::remove_all(out);
  const auto run = afm::test::run_command(std::string(AFM_BINARY) + " convert --weights " + weights + " " + kFixtures +
                                          "/" + fixture + " " + out + " " + extra + " 2>&1");
  EXPECT_EQ(run.status, 0) << run.out;
  return out;
}

std::vector<float> logits(const std::string& dir, afm::WeightFormat format) {
  afm::ModelOptions options;
  options.weights = format;
  options.max_seq_len = 64;
  auto model = afm::build_model(dir, options);
  std::vector<int32_t> tokens = {5, 17, 300, 42, 7, 1000, 3};
  std::vector<int32_t> positions(tokens.size());
  std::iota(positions.begin(), positions.end(), 0);
  auto cache = model->new_cache();
  const afm::Tensor out = model->forward(tokens, positions, *cache);
  return std::vector<float>(out.data, out.data + out.rows * out.cols);
}

TEST(Convert, PackedWeightsLoadAsViewsAndGiveTheSameLogits) {
  for (const char* fixture : {"tiny-arcee", "tiny-llama"}) {  // sharded + untied, single file + tied
    for (auto [name, format] : {std::pair{"bfp8", afm::WeightFormat::BFP8}, std::pair{"bfp4", afm::WeightFormat::BFP4}}) {
      const std::string dir = convert(fixture, name, "--shard-size 200KB");
      EXPECT_EQ(logits(dir, format), logits(kFixtures + "/" + fixture, format)) << fixture << " " << name;

      const afm::Checkpoint checkpoint = afm::Checkpoint::open(dir);
      const afm::TensorView& q = checkpoint.get("model.layers.0.self_attn.q_proj.weight");
      EXPECT_EQ(q.dtype, format == afm::WeightFormat::BFP8 ? afm::DType::BFP8 : afm::DType::BFP4);
      EXPECT_EQ(afm::make_weight(q, format).data, q.data) << "a packed weight is used in place";
      EXPECT_EQ(checkpoint.get("model.embed_tokens.weight").dtype, afm::DType::BF16) << "the embedding stays exact";
      EXPECT_TRUE(checkpoint.contains("lm_head.weight"));  // a tied one is stored converted
    }
  }
}

TEST(Convert, RefusesWhatItCannotWrite) {
  const std::string binary = std::string(AFM_BINARY) + " convert ";
  auto fails_with = [&](const std::string& args, const std::string& message) {
    const auto run = afm::test::run_command(binary + args + " 2>&1");
    EXPECT_NE(run.status, 0) << args;
    EXPECT_THAT(run.out, ::testing::HasSubstr(message)) << args;
  };
  const std::string out = ::testing::TempDir() + "/convert-refused";
  fails_with("--weights f32 " + kFixtures + "/tiny-llama " + out, "writes bf16, bfp8 or bfp4");
  fails_with(kFixtures + "/missing " + out, "missing");
  fails_with(std::string(AFM_SOURCE_DIR) + "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf " + out, "reads HF checkpoint folders");
  fails_with(kFixtures + "/tiny-llama " + kFixtures + "/tiny-arcee", "is not empty");
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace
