// afm eval: teacher-forcing accuracy of a model against a reference made by HF transformers.
#include <cstdio>
#include <sstream>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "error.h"
#include "eval.h"

namespace afm::cli {

namespace {

using json = nlohmann::json;

struct EvalFlags {
  ModelFlags model;
  std::string reference, prompt_file, reference_tokens;
  int64_t max_new_tokens = 0;
  bool json_output = false, layers = false;
};

// --weights takes one format, a comma-separated list, or "all".
std::vector<std::string> weight_formats(const std::string& flag) {
  std::vector<std::string> formats;
  if (flag == "all") {
    for (WeightFormat f : kSelectableFormats) formats.push_back(format_name(f));
    return formats;
  }
  std::stringstream list(flag);
  for (std::string format; std::getline(list, format, ',');) formats.push_back(format);
  return formats;
}

Reference load(const EvalFlags& flags) {
  if (!flags.reference.empty()) {
    Reference reference = load_reference(flags.reference);
    truncate_steps(reference, flags.max_new_tokens, flags.reference);
    return reference;
  }
  if (flags.prompt_file.empty() || flags.reference_tokens.empty())
    throw Error("give --reference FILE, or --prompt-file F with --reference-tokens R");
  Tokenizer tokenizer = load_model_tokenizer(flags.model.dir);
  const std::vector<int32_t> prompt = tokenizer.encode(read_file(flags.prompt_file), /*add_special_tokens=*/true);
  return prompt_reference(prompt, flags.reference_tokens, flags.max_new_tokens);
}

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

json to_json(const EvalResult& result, const std::string& weights) {
  json out = {{"weights", weights}, {"top1", result.top1}, {"top5", result.top5},
              {"prefill_max_rel_err", result.prefill_max_rel_err},
              {"decode_max_rel_err", result.decode_max_rel_err}, {"prompts", json::array()}};
  for (const auto& p : result.prompts) out["prompts"].push_back(to_json(p));
  return out;
}

void run(const EvalFlags& flags) {
  const Reference reference = load(flags);
  const std::vector<std::string> formats = weight_formats(flags.model.weights);
  json by_format = json::object();
  for (const std::string& format : formats) {
    ModelFlags model_flags = flags.model;
    model_flags.weights = format;
    auto model = model_flags.build();
    EvalResult result = teacher_forcing_eval(*model, reference, flags.layers);
    by_format[format] = to_json(result, format);
    if (flags.json_output) continue;
    if (formats.size() > 1) std::printf("== weights %s\n", format.c_str());
    print_text(result);
  }
  if (!flags.json_output) return;
  // One format: its result is the object. Several: one object keyed by format.
  json out = formats.size() == 1 ? by_format[formats[0]] : json{{"formats", by_format}};
  out["model"] = flags.model.dir;
  std::printf("%s\n", out.dump(1).c_str());
}

}  // namespace

void add_eval_command(CLI::App& app) {
  auto flags = std::make_shared<EvalFlags>();
  CLI::App* cmd = app.add_subcommand("eval", "teacher-forcing accuracy against an HF reference");
  flags->model.add_to(*cmd);
  cmd->add_option("--reference,-r", flags->reference, "reference.safetensors made by HF transformers");
  cmd->add_option("--prompt-file", flags->prompt_file, "a prompt, tokenized by afm (with --reference-tokens)");
  cmd->add_option("--reference-tokens", flags->reference_tokens,
                  "HF's tokens after that prompt: a reference.safetensors or a JSON array of ids");
  cmd->add_option("--max-new-tokens,-n", flags->max_new_tokens, "steps to score (default: all the reference has)");
  cmd->add_flag("--json", flags->json_output, "print one JSON object on stdout");
  cmd->add_flag("--layers", flags->layers, "also compare every layer's hidden state");
  cmd->callback([flags] { run(*flags); });
}

}  // namespace afm::cli
