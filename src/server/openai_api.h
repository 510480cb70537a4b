// OpenAI's HTTP API for completions and chat completions: requests validated into scheduler
// Jobs, and the engine's output written back in OpenAI's response and stream-chunk shapes
// (https://platform.openai.com/docs/api-reference). Anything the API would reject, or that afm
// cannot honour, is an ApiError naming the parameter, never a silently different request.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "chat_template.h"
#include "server/scheduler.h"
#include "tokenizer.h"

namespace afm::server {

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
struct ApiError : std::runtime_error {
  ApiError(int status, std::string message, std::string param = {}, std::string type = "invalid_request_error")
      : std::runtime_error(message), status(status), param(std::move(param)), type(std::move(type)) {}
  int status;
  std::string param, type;
};
nlohmann::json error_body(int status, const std::string& message, const std::string& param = {},
                          const std::string& type = "invalid_request_error");

// What the API layer needs of the served model.
struct ServedModel {
  std::string name;  // the id /v1/models lists and responses carry
  const Tokenizer* tokenizer;
  const ChatTemplate* chat_template;  // null when the model has none: chat requests get 400
  std::vector<int32_t> eos_token_ids;          // where completions stop
  std::vector<int32_t> end_of_turn_token_ids;  // where chat replies also stop
  int64_t context_length;
  int max_n;  // the most choices one request may ask for
};

enum class Endpoint { Completions, Chat };

struct ApiRequest {
  Endpoint endpoint;
  Job job;
  bool stream = false, include_usage = false;
  std::string model;
};

// Parses and validates a request body. Throws ApiError (400) for malformed JSON, wrong types,
// unknown fields, values out of range, and prompts or token counts over the context.
ApiRequest parse_request(Endpoint endpoint, const std::string& body, const ServedModel& model);
// llama.cpp's utility endpoints, /tokenize, /detokenize and /apply-template: the request body in,
// the response object out. Throws ApiError (400) like parse_request.
enum class Utility { Tokenize, Detokenize, ApplyTemplate };
nlohmann::json utility_response(Utility utility, const std::string& body, const ServedModel& model);
// The chat prompt of `messages` (an OpenAI messages array) through the model's template, as
// text; the tokens add no special tokens of their own (the template wrote them).
std::string render_chat(const nlohmann::json& messages, const ServedModel& model);

// The output of one request as it streams, turned into OpenAI's objects.
class ResponseWriter {
 public:
  ResponseWriter(const ApiRequest& request, const ServedModel& model);
  // One stream chunk per delta ("data: {...}\n\n" lines, ready to send), for stream: true.
  std::string chunks(const std::vector<ChoiceDelta>& deltas);
  std::string final_chunks(const Usage& usage);  // the usage chunk if asked, then [DONE]
  // Collects deltas for a non-streamed response, then the whole response object.
  void collect(const std::vector<ChoiceDelta>& deltas);
  nlohmann::json response(const Usage& usage) const;

 private:
  nlohmann::json logprobs_json(const ChoiceDelta& delta, int64_t text_offset) const;
  nlohmann::json chunk(nlohmann::json choices) const;

  Endpoint endpoint_;
  const ServedModel& model_;
  std::string id_, model_name_;
  int64_t created_;
  bool include_usage_;
  int n_;
  int top_logprobs_;
  std::vector<bool> role_sent_;
  struct Choice {
    std::string text, finish_reason;
    nlohmann::json logprobs;  // completions: {tokens, token_logprobs, ...}; chat: {content: [...]}
  };
  std::vector<Choice> choices_;
};

nlohmann::json usage_json(const Usage& usage);
// A token's bytes (special tokens included) as valid UTF-8, as logprobs and /tokenize show it.
std::string token_text(const Tokenizer& tokenizer, int32_t id);
std::string dump(const nlohmann::json& j);  // compact, invalid UTF-8 replaced rather than thrown on

}  // namespace afm::server
