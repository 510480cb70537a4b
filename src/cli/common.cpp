#include "cli/common.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "error.h"

namespace afm::cli {

void ModelFlags::add_to(CLI::App& cmd) {
  cmd.add_option("--model,-m", dir, "HF checkpoint folder or GGUF file (default: the embedded afm-tiny-austen)");
  cmd.add_option("--device", device, "cpu or cuda")->capture_default_str();
  cmd.add_option("--weights", weights, "weight format: f32, bf16, bfp8 or bfp4 (eval: also a list, or all)")->capture_default_str();
  cmd.add_option("--kv-cache", kv_cache, "KV cache type: f32, f16 or bf16 (default: f32 for f32 weights, else f16)")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  cmd.add_option("--activations", activations,
                 "what bfp8/bfp4 matmuls round their input to: bf16; int8 per block of 16 for the int8 kernels; "
                 "or int16 per block of 16 for the int8 GEMM (AVX-512 VNNI; bf16 elsewhere) "
                 "(default: int16 for bfp8, int8 for bfp4)")
      ->check(CLI::IsMember({"bf16", "int8", "int16"}));
  cmd.add_option("--max-seq-len", max_seq_len, "context limit (default: the config's, capped by memory)");
  cmd.add_option("--threads,-t", threads, "CPU threads (default: all cores)");
  cmd.add_option("--max-memory", max_memory,
                 "memory the weights and a full KV cache may take, e.g. 8G or 512M (default: what is available)");
}

// "8G", "512M", "64K" (powers of 1024) or a byte count.
static int64_t parse_memory_size(const std::string& text) {
  size_t used = 0;
  double value = -1;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
  }
  const std::string unit = text.substr(used);
  const double scale = unit.empty() || unit == "B" ? 1.0 : unit == "K" ? 0x1p10 : unit == "M" ? 0x1p20 : unit == "G" ? 0x1p30 : unit == "T" ? 0x1p40 : -1.0;
  if (!(value > 0) || scale < 0 || value * scale >= 0x1p62)
    throw Error("--max-memory \"" + text + "\": expected a size such as 8G, 512M or a byte count");
  return int64_t(value * scale);
}

ModelOptions ModelFlags::options() const {
  ModelOptions options;
  options.device = Device::parse(device);
  options.weights = parse_weight_format(weights);
  if (!kv_cache.empty()) options.kv_cache = parse_kv_cache_type(kv_cache);
  if (!activations.empty())
    options.block_float_inputs = activations == "int8"    ? MatmulInputs::Int8
                                 : activations == "int16" ? MatmulInputs::Int16
                                                          : MatmulInputs::BF16;
  options.max_seq_len = max_seq_len;
  if (!max_memory.empty()) options.max_memory = parse_memory_size(max_memory);
  options.num_threads = threads;
  return options;
}

std::unique_ptr<Model> ModelFlags::build() const {
  ModelOptions options = this->options();
  options.on_progress = progress_bar("loading weights", "layers");
  const auto start = std::chrono::steady_clock::now();
  auto model = build_model(dir, options);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%sloaded %s (%s, %ld layers, %s weights, %s KV cache) in %.2f s\n", progress_line_end(),
               dir.c_str(), model->config().architecture.c_str(), long(model->config().num_layers),
               format_name(model->weight_format()).c_str(), kv_cache_type_name(model->kv_cache_type()), seconds);
  return model;
}

void TokenizerFlags::add_to(CLI::App& cmd) {
  auto* model = cmd.add_option("--model,-m", model_dir, "HF model folder or GGUF file (default: the embedded model)");
  cmd.add_option("--tokenizer", tokenizer_file, "a tokenizer.json file")->excludes(model);
}

Tokenizer TokenizerFlags::load() const {
  return tokenizer_file.empty() ? load_model_tokenizer(model_dir) : Tokenizer::load(tokenizer_file);
}

std::function<void(int64_t, int64_t)> progress_bar(const std::string& label, const std::string& unit) {
  if (!isatty(STDERR_FILENO)) return nullptr;
  return [label, unit](int64_t done, int64_t total) {
    const int width = 30, filled = int(width * done / std::max<int64_t>(total, 1));
    std::fprintf(stderr, "\r%s [%s%s] %ld/%ld %s", label.c_str(), std::string(filled, '#').c_str(),
                 std::string(width - filled, ' ').c_str(), long(done), long(total), unit.c_str());
  };
}

const char* progress_line_end() { return isatty(STDERR_FILENO) ? "\r\033[K" : ""; }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace afm::cli
