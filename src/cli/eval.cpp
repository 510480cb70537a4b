// afm eval: teacher-forcing accuracy of a model against a reference made by HF transformers.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "eval.h"

namespace afm::cli {

namespace {

using json = nlohmann::json;

struct EvalFlags {
  ModelFlags model;
  std::string reference;
  bool json_output = false, layers = false;
};

std::string error_text(double err) {
  if (err < 0) return "n/a";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2e", err);
  return buf;
}

json to_json(const PromptResult& r) {
  json j = {{"prompt_tokens", r.prompt_tokens}, {"steps", r.steps}, {"top1", r.top1}, {"top5", r.top5},
            {"prefill_max_rel_err", r.prefill_max_rel_err}, {"decode_max_rel_err", r.decode_max_rel_err},
            {"top1_misses", r.top1_misses}};
  if (!r.layer_max_rel_err.empty()) j["layer_max_rel_err"] = r.layer_max_rel_err;
  return j;
}

void print_text(const EvalResult& result) {
  for (size_t i = 0; i < result.prompts.size(); i++) {
    const PromptResult& r = result.prompts[i];
    std::printf("prompt %zu: %ld tokens, %ld steps | prefill err %s | decode err %s | top-1 %.1f%% | top-5 %.1f%%\n", i,
                long(r.prompt_tokens), long(r.steps), error_text(r.prefill_max_rel_err).c_str(),
                error_text(r.decode_max_rel_err).c_str(), 100 * r.top1, 100 * r.top5);
    if (!r.top1_misses.empty()) {
      std::printf("  top-1 misses at steps:");
      for (int64_t s : r.top1_misses) std::printf(" %ld", long(s));
      std::printf("\n");
    }
    for (size_t l = 0; l < r.layer_max_rel_err.size(); l++)
      std::printf("  hidden.%zu rel err %s\n", l, error_text(r.layer_max_rel_err[l]).c_str());
  }
  std::printf("total: top-1 %.1f%% | top-5 %.1f%% | prefill max rel err %s | decode max rel err %s\n",
              100 * result.top1, 100 * result.top5, error_text(result.prefill_max_rel_err).c_str(),
              error_text(result.decode_max_rel_err).c_str());
}

void run(const EvalFlags& flags) {
  Reference reference = load_reference(flags.reference);
  auto model = flags.model.build();
  EvalResult result = teacher_forcing_eval(*model, reference, flags.layers);
  if (!flags.json_output) return print_text(result);
  json out = {{"model", flags.model.dir}, {"weights", format_name(model->weight_format())},
              {"top1", result.top1}, {"top5", result.top5},
              {"prefill_max_rel_err", result.prefill_max_rel_err},
              {"decode_max_rel_err", result.decode_max_rel_err}, {"prompts", json::array()}};
  for (const auto& p : result.prompts) out["prompts"].push_back(to_json(p));
  std::printf("%s\n", out.dump(1).c_str());
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto flags = std::make_shared<EvalFlags>();
  CLI::App* cmd = app.add_subcommand("eval", "teacher-forcing accuracy against an HF reference");
  flags->model.add_to(*cmd);
  cmd->add_option("--reference,-r", flags->reference, "reference.safetensors made by HF transformers")->required();
  cmd->add_flag("--json", flags->json_output, "print one JSON object on stdout");
  cmd->add_flag("--layers", flags->layers, "also compare every layer's hidden state");
  cmd->callback([flags] { run(*flags); });
}

}  // namespace afm::cli
