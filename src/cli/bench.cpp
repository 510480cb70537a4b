// afm bench: prefill and decode speed of a model, against the memory-bandwidth floor of decode.
// With --config it builds random weights of that shape in memory, so AFM-4.5B can be measured
// without its checkpoint.
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "cli/common.h"
#include "error.h"

namespace afm::cli {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct BenchFlags {
  ModelFlags model;
  std::string config;
  int prompt_tokens = 128, decode_tokens = 32;
  bool json_output = false;
};

// The decode floor: how fast this backend streams 1 GiB of f32 weights through a matrix-vector
// product, far beyond the caches. A decode step must read every weight once, so its time is at
// least the model's weight bytes over this rate.
double streaming_gb_per_s(const ModelOptions& options) {
  auto backend = make_backend(options.device, options.num_threads);
  const int64_t rows = 16384, cols = 16384;
  auto values = std::shared_ptr<float[]>(new float[rows * cols]);
  std::fill_n(values.get(), rows * cols, 1e-3f);
  Weight w;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = cols * int64_t(sizeof(float));
  w.data = reinterpret_cast<const uint8_t*>(values.get());
  w.owner = values;
  Tensor x = backend->tensor(1, cols), out = backend->tensor(1, rows);
  std::fill_n(x.data, cols, 1.0f);
  double best = 1e30;
  for (int pass = 0; pass < 3; pass++) {
    const auto start = Clock::now();
    backend->linear(x, w, out);
    best = std::min(best, seconds_since(start));
  }
  return double(w.bytes()) / best / 1e9;
}

void run(BenchFlags flags) {
  if (flags.prompt_tokens < 1 || flags.decode_tokens < 1) throw Error("--prompt-tokens and --decode-tokens must be positive");
  if (flags.model.max_seq_len == 0) flags.model.max_seq_len = flags.prompt_tokens + flags.decode_tokens;
  const int num_threads = flags.model.threads > 0 ? flags.model.threads : int(std::thread::hardware_concurrency());
  const double bandwidth = streaming_gb_per_s(flags.model.options());

  const auto load_start = Clock::now();
  std::unique_ptr<Model> model;
  std::string source = flags.model.dir;
  if (!flags.config.empty()) {
    source = flags.config + " (random weights)";
    ModelOptions options = flags.model.options();
    model = build_model(load_config(flags.config), Checkpoint::random(1), options);
  } else {
    model = flags.model.build();
  }
  const double load_seconds = seconds_since(load_start);
  const ModelConfig& c = model->config();

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> any_token(0, int32_t(c.vocab_size - 1));
  std::vector<int32_t> prompt(flags.prompt_tokens), positions(flags.prompt_tokens);
  for (int32_t& t : prompt) t = any_token(rng);
  std::iota(positions.begin(), positions.end(), 0);

  auto cache = model->new_cache();
  const auto prefill_start = Clock::now();
  Tensor logits = model->forward(prompt, positions, *cache, Logits::Last);
  const double prefill_seconds = seconds_since(prefill_start);

  const auto decode_start = Clock::now();
  for (int step = 0; step < flags.decode_tokens; step++) {
    const int32_t token = int32_t(std::max_element(logits.data, logits.data + logits.cols) - logits.data);
    const int32_t position = int32_t(cache->length());
    logits = model->forward({&token, 1}, {&position, 1}, *cache, Logits::Last);
  }
  const double decode_seconds = seconds_since(decode_start);

  const double ms_per_token = 1e3 * decode_seconds / flags.decode_tokens;
  const double floor_ms = 1e3 * double(model->matmul_weight_bytes()) / (bandwidth * 1e9);
  nlohmann::json out = {
      {"model", source}, {"architecture", c.architecture}, {"weights", format_name(model->weight_format())},
      {"threads", num_threads}, {"load_s", load_seconds}, {"prompt_tokens", flags.prompt_tokens},
      {"prefill_tokens_per_s", flags.prompt_tokens / prefill_seconds}, {"ttft_ms", 1e3 * prefill_seconds},
      {"decode_tokens", flags.decode_tokens}, {"decode_tokens_per_s", flags.decode_tokens / decode_seconds},
      {"decode_ms_per_token", ms_per_token}, {"weight_bytes_per_token", model->matmul_weight_bytes()},
      {"streaming_gb_per_s", bandwidth}, {"decode_floor_ms_per_token", floor_ms},
      {"decode_fraction_of_floor", floor_ms / ms_per_token}};
  if (flags.json_output) {
    std::printf("%s\n", out.dump(1).c_str());
    return;
  }
  std::printf("model %s: %s, %s weights, %d threads, loaded in %.1f s\n", source.c_str(), c.architecture.c_str(),
              format_name(model->weight_format()).c_str(), num_threads, load_seconds);
  std::printf("prefill: %d tokens in %.1f ms = %.1f tokens/s (TTFT)\n", flags.prompt_tokens, 1e3 * prefill_seconds,
              flags.prompt_tokens / prefill_seconds);
  std::printf("decode:  %d tokens, %.2f ms/token = %.2f tokens/s per user\n", flags.decode_tokens, ms_per_token,
              1e3 / ms_per_token);
  std::printf("floor:   %.1f MB of weights per token at %.1f GB/s (f32 weights streamed) = %.2f ms/token; decode runs at %.0f%% of its speed\n",
              model->matmul_weight_bytes() / 1e6, bandwidth, floor_ms, 100 * floor_ms / ms_per_token);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* cmd = app.add_subcommand("bench", "time prefill and decode against the memory-bandwidth floor");
  flags->model.add_to(*cmd);
  cmd->add_option("--config", flags->config, "a config.json: benchmark random weights of its shape")
      ->excludes(cmd->get_option("--model"));
  cmd->add_option("--prompt-tokens", flags->prompt_tokens, "prompt length for the prefill")->capture_default_str();
  cmd->add_option("--decode-tokens", flags->decode_tokens, "decode steps to time")->capture_default_str();
  cmd->add_flag("--json", flags->json_output, "print one JSON object");
  cmd->callback([flags] { run(*flags); });
}

}  // namespace afm::cli
