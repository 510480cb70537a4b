// afm generate (one prompt, streamed) and afm chat (a multi-turn REPL with the chat template).
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include "cli/common.h"
#include "error.h"
#include "generate.h"

namespace afm::cli {

namespace {

// Sampling flags override generation_config.json; only the ones given on the command line count.
struct SamplingFlags {
  CLI::Option *temperature_opt, *top_k_opt, *top_p_opt, *min_p_opt, *penalty_opt, *seed_opt, *max_new_opt;
  float temperature = 1, top_p = 1, min_p = 0, repetition_penalty = 1;
  int top_k = 0, max_new_tokens = 0;
  uint64_t seed = 0;
  std::vector<std::string> stop;

  void add_to(CLI::App& cmd) {
    temperature_opt = cmd.add_option("--temperature", temperature, "0 for greedy decoding");
    top_k_opt = cmd.add_option("--top-k", top_k, "keep the k most likely tokens (0: off)");
    top_p_opt = cmd.add_option("--top-p", top_p, "nucleus sampling threshold");
    min_p_opt = cmd.add_option("--min-p", min_p, "drop tokens below min-p times the top probability");
    penalty_opt = cmd.add_option("--repetition-penalty", repetition_penalty, "HF repetition penalty (1: off)");
    seed_opt = cmd.add_option("--seed", seed, "random seed, for reproducible sampling");
    max_new_opt = cmd.add_option("--max-new-tokens,-n", max_new_tokens, "tokens to generate at most");
    cmd.add_option("--stop", stop, "stop before this string (repeatable)");
  }

  // The model's generation_config.json (HF's defaults where it is missing), then the flags.
  GenerateOptions resolve(GenerationConfig gen, int64_t prompt_tokens) const {
    SamplingParams& s = gen.sampling;
    if (*temperature_opt) s.temperature = temperature;
    if (*top_k_opt) s.top_k = top_k;
    if (*top_p_opt) s.top_p = top_p;
    if (*min_p_opt) s.min_p = min_p;
    if (*penalty_opt) s.repetition_penalty = repetition_penalty;
    if (*seed_opt) s.seed = seed;
    // Asking for a sampling knob means asking to sample; temperature 0 means greedy.
    if (*temperature_opt || *top_k_opt || *top_p_opt || *min_p_opt) s.do_sample = true;
    if (s.temperature == 0) s.do_sample = false;
    validate(s, "sampling flags");

    GenerateOptions options;
    options.sampling = s;
    options.max_new_tokens = *max_new_opt ? max_new_tokens : gen.new_token_limit(prompt_tokens);
    if (options.max_new_tokens < 0) throw Error("--max-new-tokens must be at least 0");
    options.eos_token_ids = gen.eos_token_ids;
    for (const std::string& s : stop)
      if (s.empty()) throw Error("--stop needs a non-empty string");
    options.stop_strings = stop;
    return options;
  }
};

GenerationConfig generation_config(const ModelFlags& flags, const Model& model) {
  const ModelConfig& c = model.config();
  return load_model_generation_config(flags.dir, ModelTokenIds{c.eos_token_ids, c.bos_token_id});
}

void print_report(const GenerateStats& stats) {
  std::fprintf(stderr,
               "\n---\nprompt tokens: %ld (%ld cached) | generated tokens: %ld | TTFT: %.1f ms | decode: %.1f tokens/s "
               "per user | finished by %s\n",
               long(stats.prompt_tokens), long(stats.cached_prompt_tokens), long(stats.generated_tokens), stats.ttft_ms,
               stats.decode_tokens_per_s, stats.finish_reason.c_str());
}

void stream_to_stdout(std::string_view text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

struct GenerateFlags {
  ModelFlags model;
  SamplingFlags sampling;
  std::string prompt, prompt_file;
};

void run_generate(const GenerateFlags& flags) {
  const std::string text = flags.prompt_file.empty() ? flags.prompt : read_file(flags.prompt_file);
  Tokenizer tokenizer = load_model_tokenizer(flags.model.dir);
  auto model = flags.model.build();
  const std::vector<int32_t> prompt = tokenizer.encode(text, /*add_special_tokens=*/true);
  GenerateOptions options = flags.sampling.resolve(generation_config(flags.model, *model), int64_t(prompt.size()));
  Session session(*model);
  stream_to_stdout(text);
  GenerateStats stats = generate(*model, tokenizer, session, prompt, options, stream_to_stdout);
  std::printf("\n");
  print_report(stats);
}

struct ChatFlags {
  ModelFlags model;
  SamplingFlags sampling;
  std::string system;
};

void run_chat(const ChatFlags& flags) {
  Tokenizer tokenizer = load_model_tokenizer(flags.model.dir);
  ChatTemplate chat_template = load_model_chat_template(flags.model.dir);
  auto model = flags.model.build();
  const GenerationConfig defaults = generation_config(flags.model, *model);
  Session session(*model);
  std::vector<ChatMessage> history;
  if (!flags.system.empty()) history.push_back({"system", flags.system});
  const bool interactive = isatty(STDIN_FILENO);
  if (interactive) std::fprintf(stderr, "chat with the model: Ctrl-D exits, /reset clears the conversation\n");

  std::string line;
  while (true) {
    if (interactive) std::fprintf(stderr, "> ");
    if (!std::getline(std::cin, line)) break;
    if (line == "/reset") {
      history.resize(flags.system.empty() ? 0 : 1);
      session.cache->clear();
      session.tokens.clear();
      std::fprintf(stderr, "(conversation cleared)\n");
      continue;
    }
    if (line.empty()) continue;
    history.push_back({"user", line});
    // apply_chat_template output already holds its special tokens, so nothing is added on encode.
    const std::vector<int32_t> prompt = tokenizer.encode(chat_template.render(history, true), false);
    GenerateOptions options = flags.sampling.resolve(generation_config(flags.model, *model), int64_t(prompt.size()));
    // A turn also ends at the template's end-of-turn token.
    for (int32_t id : end_of_turn_token_ids(tokenizer)) options.eos_token_ids.push_back(id);
    std::string reply;
    GenerateStats stats = generate(*model, tokenizer, session, prompt, options, [&](std::string_view text) {
      reply += text;
      stream_to_stdout(text);
    });
    std::printf("\n");
    print_report(stats);
    history.push_back({"assistant", reply});
  }
}

}  // namespace

void add_generate_commands(CLI::App& app) {
  auto gen = std::make_shared<GenerateFlags>();
  CLI::App* g = app.add_subcommand("generate", "continue a prompt, streaming the text");
  gen->model.add_to(*g);
  gen->sampling.add_to(*g);
  auto* prompt = g->add_option("--prompt,-p", gen->prompt, "the prompt text");
  g->add_option("--prompt-file,-f", gen->prompt_file, "read the prompt from a file")->excludes(prompt);
  g->callback([gen] {
    if (gen->prompt.empty() && gen->prompt_file.empty()) throw Error("give a prompt with --prompt TEXT or --prompt-file FILE");
    run_generate(*gen);
  });

  auto chat = std::make_shared<ChatFlags>();
  CLI::App* c = app.add_subcommand("chat", "talk to the model turn by turn, with its chat template");
  chat->model.add_to(*c);
  chat->sampling.add_to(*c);
  c->add_option("--system", chat->system, "a system message to start the conversation");
  c->callback([chat] { run_chat(*chat); });
}

}  // namespace afm::cli
