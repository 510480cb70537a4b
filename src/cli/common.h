// Flags and loading shared by the afm subcommands.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>

#include "chat_template.h"
#include "model.h"
#include "model_files.h"
#include "sampler.h"
#include "tokenizer.h"

namespace afm::cli {

struct ModelFlags {
  std::string dir = AFM_DEFAULT_MODEL_DIR;
  std::string device = "cpu";
  // The fastest format that meets the bring-up note's accuracy bar (docs/ACCURACY.md).
  std::string weights = "bfp8";
  std::string activations;  // bf16, int8 or int16, or empty: the weights' default (ModelOptions::block_float_inputs)
  std::string kv_cache;  // f32, f16 or bf16; empty: the weight format's default (model.h)
  int64_t max_seq_len = 0;
  std::string max_memory;  // "8G", "512M", bytes; empty: the memory available
  int threads = 0;

  void add_to(CLI::App& cmd);
  ModelOptions options() const;
  std::unique_ptr<Model> build() const;  // with a progress line on stderr
};

// Where `tokenize` and `detokenize` find their tokenizer: a tokenizer.json, or a model folder.
struct TokenizerFlags {
  std::string model_dir = AFM_DEFAULT_MODEL_DIR;
  std::string tokenizer_file;

  void add_to(CLI::App& cmd);
  Tokenizer load() const;
};

void add_eval_command(CLI::App& app);
void add_generate_commands(CLI::App& app);  // generate and chat
void add_tokenize_commands(CLI::App& app);  // tokenize and detokenize
void add_bench_command(CLI::App& app);
void add_convert_command(CLI::App& app);  // reduced-format weights written ahead of loading
void add_init_command(CLI::App& app);        // a random-weight checkpoint of a config's shape
void add_perplexity_command(CLI::App& app);  // sliding-window perplexity of a text file
void add_template_command(CLI::App& app);    // the prompt a chat template renders
void add_serve_command(CLI::App& app);       // the OpenAI-compatible server (src/server/)

std::string read_file(const std::string& path);

// A progress callback that redraws one stderr line ("label [####    ] done/total unit"), or none
// when stderr is not a terminal; progress_line_end() then clears that line before a summary.
std::function<void(int64_t done, int64_t total)> progress_bar(const std::string& label, const std::string& unit);
const char* progress_line_end();

}  // namespace afm::cli
