// afm bench: prefill and decode speed of a model, judged against the ceilings of the same machine
// measured in the same run (backends/cpu/machine.h): decode against the memory-bandwidth floor,
// prefill against the peak of the instructions its matmuls run on (f32 FMA, or the int8 dot
// instruction for block-float weights with --activations int8 where the int8 GEMM runs). With
// --config it builds random weights of that shape in memory, so AFM-4.5B can be measured without
// its checkpoint.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "backends/cpu/dot.h"
#include "backends/cpu/int8_gemm.h"
#include "backends/cpu/machine.h"
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
  std::vector<int64_t> prompt_lens{128, 512, 2048}, context_lens{0, 4096};
  int64_t gen = 64;
  bool json_output = false;
};

std::unique_ptr<Model> load(const BenchFlags& flags, int threads, int64_t max_seq_len) {
  ModelOptions options = flags.model.options();
  options.num_threads = threads;
  options.max_seq_len = max_seq_len;
  options.on_progress = progress_bar("loading weights", "layers");
  auto model = flags.config.empty() ? build_model(flags.model.dir, options)
                                    : build_model(load_config(flags.config), Checkpoint::random(1), options);
  std::fprintf(stderr, "%s", progress_line_end());
  return model;
}

std::vector<int32_t> random_tokens(const ModelConfig& c, int64_t n) {
  static std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> any_token(0, int32_t(c.vocab_size - 1));
  std::vector<int32_t> tokens(n);
  for (int32_t& t : tokens) t = any_token(rng);
  return tokens;
}

// Seconds of one prefill of `len` tokens into an empty cache (logits of the last position only,
// as generate computes them).
double time_prefill(Model& model, int64_t len) {
  const std::vector<int32_t> prompt = random_tokens(model.config(), len);
  std::vector<int32_t> positions(len);
  std::iota(positions.begin(), positions.end(), 0);
  auto cache = model.new_cache();
  const auto start = Clock::now();
  model.forward(prompt, positions, *cache, Logits::Last);
  return seconds_since(start);
}

// Seconds of `gen` decode steps after a cache that already holds `context` positions. The cache
// is filled with random keys and values instead of a `context`-token prefill: a decode step's
// time depends on how many positions it reads, not on what they hold, and a 4,096-token prefill
// of AFM-4.5B would take minutes on a small machine.
double time_decode(Model& model, int64_t context, int64_t gen) {
  auto cache = model.new_cache();
  cache->reserve(context);
  const KVShape& s = cache->shape();
  // Rows cycle through a small table of random ones (a prime count of them, so no two heads or
  // layers line up): filling 4,096 positions of AFM-4.5B with fresh random numbers would take
  // longer than the decode steps timed after it.
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::vector<float> rows(61 * s.head_dim);
  std::generate(rows.begin(), rows.end(), [&] { return value(rng); });
  int64_t next = 0;
  for (int64_t layer = 0; layer < s.num_layers; layer++)
    for (int64_t head = 0; head < s.num_kv_heads; head++)
      for (int64_t pos = 0; pos < context; pos++, next += 2)
        cache->write(layer, head, pos, &rows[next % 61 * s.head_dim], &rows[(next + 1) % 61 * s.head_dim]);
  cache->set_length(context);
  const std::vector<int32_t> tokens = random_tokens(model.config(), gen);
  const auto start = Clock::now();
  for (int64_t step = 0; step < gen; step++) {
    const int32_t position = int32_t(cache->length());
    model.forward({&tokens[step], 1}, {&position, 1}, *cache, Logits::Last);
  }
  return seconds_since(start);
}

// The median of up to 3 runs of `timed` (which returns its seconds): repeated while the runs so
// far took under 10 s, so cheap measurements are steadied and expensive ones run once.
struct Timing {
  double seconds = 0;
  int runs = 0;
};
Timing median_of_runs(const std::function<double()>& timed) {
  std::vector<double> runs;
  double total = 0;
  while (runs.size() < 3 && (runs.empty() || total < 10)) total += runs.emplace_back(timed());
  std::sort(runs.begin(), runs.end());
  return {runs[runs.size() / 2], int(runs.size())};
}

// FLOPs of one prefill of `len` tokens: 2 per multiply-add of every layer's matmuls for each
// token, of lm_head once (only the last position's logits), and of causal attention (q·k and p·v
// of each query over the positions up to its own).
double prefill_flops(const ModelConfig& c, int64_t len) {
  const double hidden = double(c.hidden_size), q_width = double(c.num_heads * c.head_dim),
               kv_width = double(c.num_kv_heads * c.head_dim);
  const double mlp_matrices = c.hidden_act == "relu2" ? 2 : 3;  // up, down (+ gate for SwiGLU)
  const double per_token = hidden * (2 * q_width + 2 * kv_width) + mlp_matrices * hidden * double(c.intermediate_size);
  const double attention = 2 * q_width * double(len) * double(len + 1) / 2;
  return 2 * (double(c.num_layers) * (double(len) * per_token + attention) + double(c.vocab_size) * hidden);
}

// Bytes one decode step at cache length L reads: every matmul weight once, and the keys and
// values of its L + 1 positions in the cache's element type (each once per GQA group, the group's
// query heads sharing every read). Averaged over the `gen` timed steps, which run at
// L = context .. context + gen - 1.
double decode_bytes_per_token(int64_t kv_bytes_per_position, int64_t weight_bytes, int64_t context, int64_t gen) {
  return double(weight_bytes) + double(kv_bytes_per_position) * (double(context) + double(gen + 1) / 2);
}

double peak_rss_GB() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return double(usage.ru_maxrss) * 1024 / 1e9;  // ru_maxrss is in KiB on Linux
}

void check_lengths(const std::vector<int64_t>& lens, const char* flag, int64_t min) {
  if (lens.empty()) throw Error(std::string(flag) + " needs at least one length");
  for (int64_t n : lens)
    if (n < min || n > INT32_MAX)
      throw Error(std::string(flag) + " lengths must be " + (min > 0 ? "positive" : "0 or more") + ", got " + std::to_string(n));
}

// Prefill at the smallest prompt length and decode at the first context length: the pair that
// the 1-thread run repeats for scaling.
struct SpeedPair {
  double prefill_tok_per_s = 0, decode_tok_per_s = 0;
};

void run(BenchFlags flags) {
  check_lengths(flags.prompt_lens, "--prompt-lens", 1);
  check_lengths(flags.context_lens, "--context-lens", 0);
  if (flags.gen < 1) throw Error("--gen must be positive, got " + std::to_string(flags.gen));
  if (flags.model.threads < 0) throw Error("--threads must be positive (or 0 for all cores)");
  const int threads = flags.model.threads > 0 ? flags.model.threads : int(std::thread::hardware_concurrency());
  const size_t smallest = size_t(std::min_element(flags.prompt_lens.begin(), flags.prompt_lens.end()) -
                                 flags.prompt_lens.begin());
  const int64_t smallest_prompt = flags.prompt_lens[smallest];
  const int64_t max_seq_len = flags.model.max_seq_len > 0 ? flags.model.max_seq_len
      : std::max(*std::max_element(flags.prompt_lens.begin(), flags.prompt_lens.end()),
                 *std::max_element(flags.context_lens.begin(), flags.context_lens.end()) + flags.gen);
  const std::string source = flags.config.empty() ? flags.model.dir : flags.config + " (random weights)";

  // The model at N threads: load, warm up (first touch of every weight page, threads started),
  // then the timed runs.
  const auto load_start = Clock::now();
  auto model = load(flags, threads, max_seq_len);
  const double load_s = seconds_since(load_start);
  const ModelConfig c = model->config();
  const int64_t weight_bytes = model->matmul_weight_bytes();
  const int64_t kv_bytes_per_position = model->kv_bytes_per_position();
  const std::string weights = format_name(model->weight_format());
  const std::string kv_cache = kv_cache_type_name(model->kv_cache_type());
  const std::string activations =
      !flags.model.activations.empty() ? flags.model.activations
      : default_block_float_inputs(model->weight_format()) == MatmulInputs::Int8 ? "int8"
                                                                                  : "int16";
  std::fprintf(stderr, "loaded %s (%s, %s weights) in %.2f s; warming up\n", source.c_str(), c.architecture.c_str(),
               weights.c_str(), load_s);
  auto warm_up = [&](Model& m) {
    time_prefill(m, std::min<int64_t>(smallest_prompt, 16));
    time_decode(m, 0, 2);
  };
  warm_up(*model);

  std::vector<Timing> prefill, decode;
  for (int64_t len : flags.prompt_lens) {
    prefill.push_back(median_of_runs([&] { return time_prefill(*model, len); }));
    std::fprintf(stderr, "prefill %ld tokens: %.2f tok/s\n", long(len), len / prefill.back().seconds);
  }
  for (int64_t context : flags.context_lens) {
    decode.push_back(median_of_runs([&] { return time_decode(*model, context, flags.gen); }));
    std::fprintf(stderr, "decode at context %ld: %.2f tok/s\n", long(context), flags.gen / decode.back().seconds);
  }
  const double rss_GB = peak_rss_GB();
  const SpeedPair at_n{smallest_prompt / prefill[smallest].seconds, flags.gen / decode[0].seconds};

  // The same pair at 1 thread, from a fresh 1-thread model (a backend's thread count is fixed).
  SpeedPair at_1 = at_n;
  if (threads > 1) {
    model.reset();
    std::fprintf(stderr, "scaling: reloading with 1 thread\n");
    model = load(flags, 1, max_seq_len);
    warm_up(*model);
    at_1.prefill_tok_per_s = smallest_prompt / median_of_runs([&] { return time_prefill(*model, smallest_prompt); }).seconds;
    at_1.decode_tok_per_s = flags.gen / median_of_runs([&] { return time_decode(*model, flags.context_lens[0], flags.gen); }).seconds;
  }

  // The machine's ceilings at the same thread count, measured last so their 2 GiB buffer neither
  // counts in the peak RSS nor shares memory with the model.
  std::fprintf(stderr, "measuring the machine: read bandwidth, f32 FMA and int8 dot peaks\n");
  model.reset();
  cpu::ThreadPool pool(threads);
  const double bandwidth = cpu::read_bandwidth_GBps(pool);
  const cpu::Peak fma = cpu::f32_fma_peak(pool), int8 = cpu::int8_dot_peak(pool);

  nlohmann::json out = {
      {"model", source}, {"architecture", c.architecture}, {"weights", weights}, {"kv_cache", kv_cache},
      {"activations", activations}, {"threads", threads},
      {"kernel_isa", cpu::isa_name(cpu::best_isa())}, {"load_s", load_s}, {"rss_GB", rss_GB},
      {"bandwidth_GBps", bandwidth},
      {"compute_peak_GFLOPs", fma.all_threads}, {"compute_peak_per_thread_GFLOPs", fma.per_thread},
      {"compute_isa", fma.isa}, {"int8_peak_GOPs", int8.all_threads}, {"int8_peak_per_thread_GOPs", int8.per_thread},
      {"int8_isa", int8.isa}, {"matmul_weight_bytes", weight_bytes}, {"gen", flags.gen}};
  // Int16 activations spend two int8 dot products on each multiply-add, so their ceiling is half
  // the int8 peak.
  const bool integer_activations = activations == "int8" || activations == "int16";
  const bool int8_prefill = integer_activations && (weights == "bfp8" || weights == "bfp4") &&
                            cpu::int8_gemm_supported(cpu::best_isa());
  const bool int16 = activations == "int16";
  const double prefill_peak_ops = int8_prefill ? int8.all_threads / (int16 ? 2 : 1) : fma.all_threads;
  const std::string prefill_peak_name = !int8_prefill ? "f32 FMA" : int16 ? "int8 dot, 2 per multiply-add" : "int8 dot";
  out["prefill_peak"] = prefill_peak_name;
  out["prefill_peak_GOPs"] = prefill_peak_ops;
  for (size_t i = 0; i < flags.prompt_lens.size(); i++) {
    const std::string key = std::to_string(flags.prompt_lens[i]);
    const double tok_per_s = flags.prompt_lens[i] / prefill[i].seconds;
    const double gflops = prefill_flops(c, flags.prompt_lens[i]) / prefill[i].seconds / 1e9;
    out["prefill_tok_per_s"][key] = tok_per_s;
    out["prefill_GFLOPs"][key] = gflops;
    out["prefill_pct_of_peak"][key] = 100 * gflops / prefill_peak_ops;
    out["prefill_runs"][key] = prefill[i].runs;
  }
  struct DecodeRow {
    int64_t context;
    double bytes, tok_per_s, floor, pct;
  };
  std::vector<DecodeRow> rows;
  for (size_t i = 0; i < flags.context_lens.size(); i++) {
    DecodeRow r{flags.context_lens[i], decode_bytes_per_token(kv_bytes_per_position, weight_bytes, flags.context_lens[i], flags.gen),
                flags.gen / decode[i].seconds, 0, 0};
    r.floor = bandwidth * 1e9 / r.bytes;
    r.pct = 100 * r.tok_per_s / r.floor;
    rows.push_back(r);
    out["decode"][std::to_string(r.context)] = {{"bytes_per_token", r.bytes}, {"tok_per_s", r.tok_per_s},
                                                {"floor_tok_per_s", r.floor}, {"pct_of_floor", r.pct},
                                                {"runs", decode[i].runs}};
  }
  // The headline decode figures: at the first --context-lens.
  out["decode_context_len"] = rows[0].context;
  out["bytes_per_token"] = rows[0].bytes;
  out["decode_tok_per_s"] = rows[0].tok_per_s;
  out["floor_tok_per_s"] = rows[0].floor;
  out["decode_pct_of_floor"] = rows[0].pct;
  const std::string n = std::to_string(threads);
  out["scaling"] = {{"prompt_len", smallest_prompt}, {"context_len", flags.context_lens[0]},
                    {"prefill_tok_per_s", {{"1", at_1.prefill_tok_per_s}, {n, at_n.prefill_tok_per_s}}},
                    {"decode_tok_per_s", {{"1", at_1.decode_tok_per_s}, {n, at_n.decode_tok_per_s}}}};
  if (flags.json_output) {
    std::printf("%s\n", out.dump(1).c_str());
    return;
  }

  std::printf("model    %s: %s, %s weights, %d threads (afm kernels: %s)\n", source.c_str(), c.architecture.c_str(),
              weights.c_str(), threads, cpu::isa_name(cpu::best_isa()));
  std::printf("load     %.2f s, peak RSS %.2f GB\n", load_s, rss_GB);
  std::printf("machine  streaming read %.1f GB/s; f32 FMA peak %.1f GFLOP/s (%s, %.1f per thread); int8 dot peak "
              "%.1f GOP/s (%s, %.1f per thread)\n",
              bandwidth, fma.all_threads, fma.isa.c_str(), fma.per_thread, int8.all_threads, int8.isa.c_str(),
              int8.per_thread);
  std::printf("\nprefill  (median of runs after a warm-up; FLOPs = 2 x multiply-adds of the matmuls per token, lm_head\n"
              "         once, causal attention included; %% of the %s peak, the instructions its matmuls run on)\n",
              prefill_peak_name.c_str());
  std::printf("  %8s %10s %10s %8s %5s\n", "prompt", "tok/s", "GFLOP/s", "% peak", "runs");
  for (size_t i = 0; i < flags.prompt_lens.size(); i++) {
    const std::string key = std::to_string(flags.prompt_lens[i]);
    std::printf("  %8ld %10.2f %10.2f %7.1f%% %5d\n", long(flags.prompt_lens[i]), out["prefill_tok_per_s"][key].get<double>(),
                out["prefill_GFLOPs"][key].get<double>(), out["prefill_pct_of_peak"][key].get<double>(), prefill[i].runs);
  }
  std::printf("\ndecode   (%ld steps after a cache of `context` random keys/values; bytes/token = matmul weights + the\n"
              "         %s KV read; floor = bandwidth / bytes)\n", long(flags.gen), kv_cache.c_str());
  std::printf("  %8s %10s %10s %10s %12s %8s %5s\n", "context", "tok/s", "ms/token", "MB/token", "floor tok/s",
              "% floor", "runs");
  for (size_t i = 0; i < rows.size(); i++)
    std::printf("  %8ld %10.2f %10.2f %10.1f %12.2f %7.1f%% %5d\n", long(rows[i].context), rows[i].tok_per_s,
                1e3 / rows[i].tok_per_s, rows[i].bytes / 1e6, rows[i].floor, rows[i].pct, decode[i].runs);
  std::printf("\nscaling  1 -> %d threads: prefill %ld tokens %.2f -> %.2f tok/s (%.2fx), decode at context %ld "
              "%.2f -> %.2f tok/s (%.2fx)\n",
              threads, long(smallest_prompt), at_1.prefill_tok_per_s, at_n.prefill_tok_per_s,
              at_n.prefill_tok_per_s / at_1.prefill_tok_per_s, long(flags.context_lens[0]), at_1.decode_tok_per_s,
              at_n.decode_tok_per_s, at_n.decode_tok_per_s / at_1.decode_tok_per_s);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* cmd = app.add_subcommand("bench", "time prefill and decode against this machine's bandwidth and compute peak");
  flags->model.add_to(*cmd);
  cmd->add_option("--config", flags->config, "a config.json: benchmark random weights of its shape")
      ->excludes(cmd->get_option("--model"));
  cmd->add_option("--prompt-lens", flags->prompt_lens, "prompt lengths to time prefill at")->delimiter(',')->capture_default_str();
  cmd->add_option("--gen", flags->gen, "decode steps to time at each context length")->capture_default_str();
  cmd->add_option("--context-lens", flags->context_lens, "cache lengths to time decode at")->delimiter(',')->capture_default_str();
  cmd->add_flag("--json", flags->json_output, "print one JSON object");
  cmd->callback([flags] { run(*flags); });
}

}  // namespace afm::cli
