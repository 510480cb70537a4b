// afm perplexity: sliding-window perplexity of a text file, computed as HF transformers' guide does.
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "perplexity.h"

namespace afm::cli {

namespace {

struct PerplexityFlags {
  ModelFlags model;
  std::string text_file;
  int64_t context = 0, stride = 0;
  bool json_output = false;
};

void run(PerplexityFlags flags) {
  const std::string text = read_file(flags.text_file);
  // tokenizer(text) in HF adds special tokens, so the sequence starts with BOS as it does there.
  const std::vector<int32_t> tokens = load_model_tokenizer(flags.model.dir).encode(text, true);
  // A window never needs more positions than --ctx, so don't size the KV cache for the config's limit.
  if (flags.context && !flags.model.max_seq_len) flags.model.max_seq_len = flags.context;
  auto model = flags.model.build();

  PerplexityOptions options;
  options.context = flags.context;
  options.stride = flags.stride;
  options.on_progress = progress_bar("perplexity", "tokens");
  const auto start = std::chrono::steady_clock::now();
  const PerplexityResult result = perplexity(*model, tokens, options);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%s%ld text tokens in %ld windows in %.2f s (%.0f tokens/s)\n", progress_line_end(),
               long(tokens.size()), long(result.windows), seconds, double(tokens.size()) / seconds);

  if (flags.json_output) {
    const nlohmann::json out = {{"perplexity", result.perplexity}, {"nll_per_token", result.nll_per_token},
                                {"tokens", result.tokens_scored},  {"windows", result.windows},
                                {"ctx", result.context},           {"stride", result.stride},
                                {"weights", format_name(model->weight_format())}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("perplexity: %.3f over %ld tokens (%ld windows, ctx %ld, stride %ld)\n", result.perplexity,
                long(result.tokens_scored), long(result.windows), long(result.context), long(result.stride));
  }
}

}  // namespace

void add_perplexity_command(CLI::App& app) {
  auto flags = std::make_shared<PerplexityFlags>();
  CLI::App* cmd = app.add_subcommand("perplexity", "sliding-window perplexity of a text file (HF transformers' method)");
  flags->model.add_to(*cmd);
  cmd->add_option("--text", flags->text_file, "UTF-8 text file to score")->required();
  cmd->add_option("--ctx", flags->context, "tokens per window (default: the model's max_seq_len)");
  cmd->add_option("--stride", flags->stride, "tokens between window starts (default: --ctx, disjoint windows)");
  cmd->add_flag("--json", flags->json_output, "print one JSON object on stdout");
  cmd->callback([flags] { run(*flags); });
}

}  // namespace afm::cli
