// afm bench through the binary (its JSON is complete and self-consistent) and the machine probes
// it reports against. Speed itself is never asserted: it depends on the machine and its load.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "backends/cpu/int8_gemm.h"
#include "backends/cpu/machine.h"
#include "support/subprocess.h"

namespace {

const std::string kRoot = AFM_SOURCE_DIR;

afm::test::Result bench(const std::string& args) {
  return afm::test::run_command(std::string(AFM_BINARY) + " bench " + args + " 2>/dev/null");
}

void expect_positive(const nlohmann::json& j, const std::string& key) {
  ASSERT_TRUE(j.contains(key)) << key;
  const double v = j[key].get<double>();
  EXPECT_TRUE(std::isfinite(v) && v > 0) << key << " = " << v;
}

TEST(BenchMachine, ProbesGivePlausiblePositiveNumbers) {
  afm::cpu::ThreadPool pool(2);
  const double bandwidth = afm::cpu::read_bandwidth_GBps(pool, int64_t(64) << 20);
  EXPECT_TRUE(std::isfinite(bandwidth) && bandwidth > 0.01 && bandwidth < 1e5) << bandwidth;
  for (const afm::cpu::Peak& peak : {afm::cpu::f32_fma_peak(pool), afm::cpu::int8_dot_peak(pool)}) {
    EXPECT_FALSE(peak.isa.empty());
    EXPECT_TRUE(std::isfinite(peak.per_thread) && peak.per_thread > 0.01 && peak.per_thread < 1e5) << peak.isa;
    EXPECT_TRUE(std::isfinite(peak.all_threads) && peak.all_threads > 0.01 && peak.all_threads < 1e6) << peak.isa;
  }
}

// Every key, finite and positive, with the floor and the percentages derived as documented.
void check_report(const nlohmann::json& j, const std::vector<std::string>& prompt_lens) {
  for (const char* key : {"load_s", "rss_GB", "bandwidth_GBps", "compute_peak_GFLOPs", "bytes_per_token",
                          "decode_tok_per_s", "floor_tok_per_s", "decode_pct_of_floor", "int8_peak_GOPs"})
    expect_positive(j, key);
  EXPECT_NEAR(j["floor_tok_per_s"].get<double>(), j["bandwidth_GBps"].get<double>() * 1e9 / j["bytes_per_token"].get<double>(),
              1e-9 * j["floor_tok_per_s"].get<double>());
  EXPECT_NEAR(j["decode_pct_of_floor"].get<double>(),
              100 * j["decode_tok_per_s"].get<double>() / j["floor_tok_per_s"].get<double>(),
              1e-9 * j["decode_pct_of_floor"].get<double>());
  for (const char* keyed : {"prefill_tok_per_s", "prefill_pct_of_peak"}) {
    ASSERT_TRUE(j.contains(keyed)) << keyed;
    std::vector<std::string> keys;
    for (const auto& [key, value] : j[keyed].items()) {
      keys.push_back(key);
      expect_positive(j[keyed], key);
    }
    std::sort(keys.begin(), keys.end());
    EXPECT_EQ(keys, prompt_lens) << keyed;
  }
  // Against the peak of the instructions prefill runs on: int16 activations take two int8 dot
  // products per multiply-add.
  const std::string name = j["prefill_peak"];
  const double peak = name == "f32 FMA" ? j["compute_peak_GFLOPs"].get<double>()
                      : name == "int8 dot" ? j["int8_peak_GOPs"].get<double>()
                                           : j["int8_peak_GOPs"].get<double>() / 2;
  EXPECT_TRUE(name == "f32 FMA" || name == "int8 dot" || name == "int8 dot, 2 per multiply-add") << name;
  EXPECT_DOUBLE_EQ(j["prefill_peak_GOPs"].get<double>(), peak);
  for (const auto& [len, pct] : j["prefill_pct_of_peak"].items())
    EXPECT_NEAR(pct.get<double>(), 100 * j["prefill_GFLOPs"][len].get<double>() / peak, 1e-9 * pct.get<double>());
}

// With integer activations on block-float weights, prefill runs the int8 GEMM where the CPU has
// AVX-512 VNNI, and is judged against the int8 dot peak, or half of it for int16, bfp8's default
// (two dot products per multiply-add); elsewhere against the f32 FMA peak. bfp4 defaults to int8.
TEST(BenchCli, IntegerPrefillIsJudgedAgainstItsPeak) {
  const bool vnni = afm::cpu::int8_gemm_supported(afm::cpu::best_isa());
  for (auto [flags, activations, peak] : {std::tuple{"--weights bfp8 --activations int8", "int8", "int8 dot"},
                                          std::tuple{"--weights bfp8", "int16", "int8 dot, 2 per multiply-add"},
                                          std::tuple{"--weights bfp4", "int8", "int8 dot"}}) {
    const auto run = bench("--config " + kRoot + "/tests/fixtures/tiny-arcee/config.json " + flags +
                           " --prompt-lens 16 --gen 2 --context-lens 0 --threads 1 --json");
    ASSERT_EQ(run.status, 0) << run.out;
    const auto j = nlohmann::json::parse(run.out);
    check_report(j, {"16"});
    EXPECT_EQ(j["activations"], activations) << flags;
    EXPECT_EQ(j["prefill_peak"], vnni ? peak : "f32 FMA") << flags;
  }
}

TEST(BenchCli, JsonReportOnRandomWeights) {
  const auto run = bench("--config " + kRoot + "/tests/fixtures/tiny-arcee/config.json --prompt-lens 8,16 --gen 4 "
                         "--context-lens 0,32 --threads 2 --json");
  ASSERT_EQ(run.status, 0) << run.out;
  const auto j = nlohmann::json::parse(run.out);
  check_report(j, {"16", "8"});
  for (const char* context : {"0", "32"}) {
    ASSERT_TRUE(j["decode"].contains(context)) << context;
    const auto& d = j["decode"][context];
    EXPECT_NEAR(d["floor_tok_per_s"].get<double>(), j["bandwidth_GBps"].get<double>() * 1e9 / d["bytes_per_token"].get<double>(),
                1e-9 * d["floor_tok_per_s"].get<double>());
  }
  // More context, more KV bytes to read per token.
  EXPECT_GT(j["decode"]["32"]["bytes_per_token"].get<double>(), j["decode"]["0"]["bytes_per_token"].get<double>());
  EXPECT_EQ(j["scaling"]["prompt_len"], 8);
  EXPECT_TRUE(j["scaling"]["decode_tok_per_s"].contains("1"));
  EXPECT_TRUE(j["scaling"]["decode_tok_per_s"].contains("2"));
}

TEST(BenchCli, GgufModel) {
  const std::string gguf = kRoot + "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(gguf)) GTEST_SKIP() << gguf << " is missing (scripts/install-deps.sh downloads it)";
  const auto run = bench("--model " + gguf + " --weights bfp8 --prompt-lens 4 --gen 2 --context-lens 0 --threads 1 --json");
  ASSERT_EQ(run.status, 0) << run.out;
  const auto j = nlohmann::json::parse(run.out);
  check_report(j, {"4"});
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
}

TEST(BenchCli, BadFlagsAreRefused) {
  const std::string config = "--config " + kRoot + "/tests/fixtures/tiny-arcee/config.json ";
  for (const std::string& args : {config + "--prompt-lens 0", config + "--prompt-lens 8,-4", config + "--gen 0",
                                  config + "--context-lens -1", config + "--prompt-lens ''",
                                  config + "--model " + kRoot + "/models/afm-tiny-austen"}) {
    const auto run = afm::test::run_command(std::string(AFM_BINARY) + " bench " + args + " 2>&1");
    EXPECT_NE(run.status, 0) << args;
    EXPECT_TRUE(run.out.find("error") != std::string::npos || run.out.find("excludes") != std::string::npos ||
                run.out.find("--") != std::string::npos)
        << args << ": " << run.out;
  }
}

}  // namespace
