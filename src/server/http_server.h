// `afm serve`'s HTTP front: OpenAI's endpoints and llama.cpp's utility ones over cpp-httplib,
// in front of the Scheduler. See docs/SERVER.md for the API, the limits and the metrics.
#pragma once
#include <cstdint>
#include <string>

#include "chat_template.h"
#include "model.h"
#include "server/scheduler.h"
#include "tokenizer.h"

namespace afm::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string api_key;               // when set, every endpoint but /health and /metrics needs it
  std::string model_name;            // the id /v1/models lists
  size_t max_body_bytes = 8u << 20;  // larger bodies get 413
  int max_n = 16;                    // choices per request
  SchedulerOptions scheduler;
};

// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts afterwards, so that
// serve() alone receives them. Call before the model (and its thread pool) is built.
void block_termination_signals();

// Serves until SIGINT or SIGTERM, then refuses new requests, lets the running and queued ones
// finish, and returns 0. Prints "afm serve: listening on http://HOST:PORT" once the port is bound
// (--port 0 picks a free one).
int serve(Model& model, const Tokenizer& tokenizer, const ChatTemplate* chat_template,
          std::vector<int32_t> eos_token_ids, const ServerOptions& options);

}  // namespace afm::server
