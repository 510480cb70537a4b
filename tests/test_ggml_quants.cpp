// ggml block dequantization against gguf-py's numpy dequantizers (tests/oracles/gguf_quants.py), bit
// for bit, on random blocks with finite, infinite and NaN scales and on blocks gguf-py quantized.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "dtype.h"
#include "error.h"
#include "ggml_quants.h"
#include "support/subprocess.h"

using afm::DType;

namespace {

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class GgmlQuantsType : public ::testing::TestWithParam<DType> {};

TEST_P(GgmlQuantsType, MatchesGgufPyBitForBit) {
  const DType type = GetParam();
  const std::string name = afm::dtype_name(type);
  const std::string out = ::testing::TempDir() + "afm_gguf_quants_" + name;
  const afm::test::Result run = afm::test::run_oracle("gguf_quants.py " + name + " 7 256 " + out);
  ASSERT_EQ(run.status, 0) << run.out;

  const std::vector<uint8_t> blocks = read_file(out + ".blocks"), want_bytes = read_file(out + ".f32");
  const afm::BlockLayout layout = afm::dtype_block(type);
  const int64_t n = int64_t(blocks.size()) / layout.bytes * layout.values;
  ASSERT_GT(n, 0);
  ASSERT_EQ(int64_t(blocks.size()) % layout.bytes, 0);
  ASSERT_EQ(int64_t(want_bytes.size()), n * 4);
  std::vector<float> want(n);
  std::memcpy(want.data(), want_bytes.data(), want_bytes.size());

  std::vector<float> got(n + 1, 123.0f);  // one sentinel past the end
  afm::dequantize_ggml(type, blocks.data(), n, got.data());
  EXPECT_EQ(got[n], 123.0f) << "wrote past the end";
  std::vector<float> routed(n);
  afm::floats_to_f32(type, blocks.data(), n, routed.data());
  EXPECT_EQ(std::memcmp(routed.data(), got.data(), size_t(n) * 4), 0) << "floats_to_f32 differs from dequantize_ggml";

  // NaN payloads are numpy's business; everything else, signed zeros included, must match exactly.
  int64_t mismatches = 0;
  for (int64_t i = 0; i < n && mismatches < 10; i++) {
    const bool ok = std::isnan(want[i]) ? std::isnan(got[i])
                                        : std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(want[i]);
    if (!ok) {
      mismatches++;
      ADD_FAILURE() << name << " value " << i << " (block " << i / layout.values << "): got " << got[i] << " (0x"
                    << std::hex << std::bit_cast<uint32_t>(got[i]) << "), numpy " << want[i] << " (0x"
                    << std::bit_cast<uint32_t>(want[i]) << ")";
    }
  }
}

TEST_P(GgmlQuantsType, RejectsPartialBlocks) {
  const afm::BlockLayout layout = afm::dtype_block(GetParam());
  std::vector<uint8_t> blocks(2 * layout.bytes);
  std::vector<float> out(2 * layout.values);
  EXPECT_THROW(afm::dequantize_ggml(GetParam(), blocks.data(), layout.values + 1, out.data()), afm::Error);
  EXPECT_THROW(afm::floats_to_f32(GetParam(), blocks.data(), layout.values - 1, out.data()), afm::Error);
  EXPECT_NO_THROW(afm::dequantize_ggml(GetParam(), blocks.data(), 2 * layout.values, out.data()));
}

INSTANTIATE_TEST_SUITE_P(GgmlQuants, GgmlQuantsType,
                         ::testing::Values(DType::Q4_0, DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::Q8_0, DType::Q2_K,
                                           DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K),
                         [](const ::testing::TestParamInfo<DType>& info) { return afm::dtype_name(info.param); });

TEST(GgmlQuants, RejectsTypesWithoutBlocks) {
  const uint8_t src[8] = {};
  float out[2];
  for (DType type : {DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64}) {
    try {
      afm::dequantize_ggml(type, src, 1, out);
      ADD_FAILURE() << afm::dtype_name(type) << " was accepted";
    } catch (const afm::Error& e) {
      EXPECT_NE(std::string(e.what()).find(afm::dtype_name(type)), std::string::npos) << e.what();
    }
  }
}

}  // namespace
