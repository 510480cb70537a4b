// afm serve: the OpenAI-compatible HTTP server (src/server/) on one model.
#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "cli/common.h"
#include "error.h"
#include "server/http_server.h"

namespace afm::cli {

namespace {

struct ServeFlags {
  ModelFlags model;
  server::ServerOptions server;
  int64_t kv_blocks = 0;
};

// Without --kv-blocks: room for every batch slot at the full context, but at most half the
// memory left after loading (blocks take memory only once used, so this is a ceiling).
int64_t default_kv_blocks(const Model& model, int max_batch) {
  const int64_t block_size = model.kv_pool()->shape().block_size;
  const int64_t full = int64_t(max_batch) * ((model.max_seq_len() + block_size - 1) / block_size);
  const int64_t memory = available_memory();
  const int64_t fits = memory > 0 ? memory / 2 / model.kv_pool()->block_bytes() : full;
  return std::max<int64_t>(1, std::min(full, fits));
}

void run_serve(ServeFlags& flags) {
  server::block_termination_signals();  // before any thread starts, so only the server sees them
  Tokenizer tokenizer = load_model_tokenizer(flags.model.dir);
  std::optional<ChatTemplate> chat_template;
  try {
    chat_template = load_model_chat_template(flags.model.dir);
  } catch (const Error& e) {
    std::fprintf(stderr, "afm serve: no chat template (%s); /v1/chat/completions will refuse requests\n", e.what());
  }
  auto model = flags.model.build();
  const int64_t blocks = flags.kv_blocks > 0 ? flags.kv_blocks : default_kv_blocks(*model, flags.server.scheduler.max_batch);
  model->resize_kv_pool(blocks);
  const ModelConfig& c = model->config();
  const GenerationConfig generation = load_model_generation_config(flags.model.dir, ModelTokenIds{c.eos_token_ids, c.bos_token_id});
  if (flags.server.model_name.empty()) flags.server.model_name = std::filesystem::path(flags.model.dir).filename().string();
  std::fprintf(stderr, "afm serve: %ld KV blocks of %ld tokens (%.1f KB each), batch %d, queue %d, context %ld\n",
               long(blocks), long(model->kv_pool()->shape().block_size), double(model->kv_pool()->block_bytes()) / 1e3,
               flags.server.scheduler.max_batch, flags.server.scheduler.max_queue, long(model->max_seq_len()));
  const int status = server::serve(*model, tokenizer, chat_template ? &*chat_template : nullptr,
                                   generation.eos_token_ids, flags.server);
  if (status != 0) throw Error("the server stopped unexpectedly");
}

}  // namespace

void add_serve_command(CLI::App& app) {
  auto flags = std::make_shared<ServeFlags>();
  CLI::App* s = app.add_subcommand("serve", "an OpenAI-compatible HTTP server with continuous batching");
  flags->model.add_to(*s);
  s->add_option("--host", flags->server.host, "address to listen on (loopback unless told otherwise)")->capture_default_str();
  s->add_option("--port", flags->server.port, "port to listen on (0: any free one)")->capture_default_str();
  s->add_option("--max-batch", flags->server.scheduler.max_batch, "sequences decoded together in one step")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  s->add_option("--max-queue", flags->server.scheduler.max_queue, "requests waiting beyond it get 429")
      ->check(CLI::Range(0, 100000))
      ->capture_default_str();
  s->add_option("--prefill-chunk", flags->server.scheduler.prefill_chunk, "prompt tokens prefilled per step")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20))
      ->capture_default_str();
  s->add_option("--ctx", flags->model.max_seq_len, "context length per sequence (default: the model's, capped by memory)");
  s->add_option("--kv-blocks", flags->kv_blocks, "KV cache blocks of 16 tokens (default: --max-batch full contexts, capped by memory)")
      ->check(CLI::PositiveNumber);
  s->add_option("--api-key", flags->server.api_key, "require Authorization: Bearer KEY (not on /health and /metrics)");
  s->add_option("--model-name", flags->server.model_name, "the model id /v1/models lists (default: the folder or file name)");
  s->add_option("--max-n", flags->server.max_n, "most choices (n) per request")->check(CLI::Range(1, 1024))->capture_default_str();
  s->callback([flags] { run_serve(*flags); });
}

}  // namespace afm::cli
