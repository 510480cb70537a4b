// afm: the command-line front end. Each subcommand parses its flags with CLI11 and calls the library.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "error.h"
#include "eval.h"
#include "model.h"

namespace {

using json = nlohmann::json;

struct ModelFlags {
  std::string dir = AFM_DEFAULT_MODEL_DIR;
  std::string device = "cpu";
  std::string weights = "f32";
  int64_t max_seq_len = 0;
  int threads = 0;

  void add_to(CLI::App& cmd) {
    cmd.add_option("--model,-m", dir, "HF checkpoint folder (default: the embedded afm-tiny-austen)");
    cmd.add_option("--device", device, "cpu or cuda")->capture_default_str();
    cmd.add_option("--weights", weights, "weight format: f32, bf16, bfp8 or bfp4")->capture_default_str();
    cmd.add_option("--max-seq-len", max_seq_len, "context limit (default: the config's, capped by memory)");
    cmd.add_option("--threads,-t", threads, "CPU threads (default: all cores)");
  }

  std::unique_ptr<afm::Model> build() const {
    afm::ModelOptions options;
    options.device = afm::Device::parse(device);
    options.weights = afm::parse_weight_format(weights);
    options.max_seq_len = max_seq_len;
    options.num_threads = threads;
    return afm::build_model(dir, options);
  }
};

json to_json(const afm::PromptResult& r) {
  json j = {{"prompt_tokens", r.prompt_tokens}, {"steps", r.steps}, {"top1", r.top1}, {"top5", r.top5},
            {"prefill_max_rel_err", r.prefill_max_rel_err}, {"decode_max_rel_err", r.decode_max_rel_err},
            {"top1_misses", r.top1_misses}};
  if (!r.layer_max_rel_err.empty()) j["layer_max_rel_err"] = r.layer_max_rel_err;
  return j;
}

std::string error_text(double err) {
  char buf[32];
  if (err < 0) return "n/a";
  std::snprintf(buf, sizeof buf, "%.2e", err);
  return buf;
}

void print_eval(const afm::EvalResult& result) {
  for (size_t i = 0; i < result.prompts.size(); i++) {
    const afm::PromptResult& r = result.prompts[i];
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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"afm: an inference engine for Arcee AFM-4.5B and Llama-family models"};
  app.require_subcommand(1);

  ModelFlags eval_model;
  std::string reference_path;
  bool eval_json = false, eval_layers = false;
  CLI::App* eval = app.add_subcommand("eval", "teacher-forcing accuracy against an HF reference");
  eval_model.add_to(*eval);
  eval->add_option("--reference,-r", reference_path, "reference.safetensors made by HF transformers")->required();
  eval->add_flag("--json", eval_json, "print one JSON object on stdout");
  eval->add_flag("--layers", eval_layers, "also compare every layer's hidden state");

  CLI11_PARSE(app, argc, argv);
  try {
    if (*eval) {
      afm::Reference reference = afm::load_reference(reference_path);
      auto model = eval_model.build();
      afm::EvalResult result = afm::teacher_forcing_eval(*model, reference, eval_layers);
      if (eval_json) {
        json out = {{"model", eval_model.dir}, {"weights", afm::format_name(model->weight_format())},
                    {"top1", result.top1}, {"top5", result.top5},
                    {"prefill_max_rel_err", result.prefill_max_rel_err},
                    {"decode_max_rel_err", result.decode_max_rel_err}, {"prompts", json::array()}};
        for (const auto& p : result.prompts) out["prompts"].push_back(to_json(p));
        std::printf("%s\n", out.dump(1).c_str());
      } else {
        print_eval(result);
      }
    }
  } catch (const afm::Error& e) {
    std::fprintf(stderr, "afm: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
