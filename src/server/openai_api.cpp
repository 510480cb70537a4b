#include "server/openai_api.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <optional>
#include <random>

#include "error.h"

namespace afm::server {

using json = nlohmann::json;

namespace {

[[noreturn]] void invalid(const std::string& message, const std::string& param = {}) { throw ApiError(400, message, param); }

std::string random_id(const char* prefix) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  char hex[25];
  std::snprintf(hex, sizeof hex, "%016llx%08llx", (unsigned long long)rng(), (unsigned long long)(rng() & 0xffffffffu));
  return prefix + std::string(hex);
}

// Typed, range-checked reads of optional fields; null counts as absent, as in OpenAI's API.
struct Fields {
  const json& body;

  const json* get(const char* name) const {
    auto it = body.find(name);
    return it == body.end() || it->is_null() ? nullptr : &*it;
  }
  std::optional<double> number(const char* name, double lo, double hi) const {
    const json* v = get(name);
    if (!v) return std::nullopt;
    if (!v->is_number()) invalid(std::string(name) + " must be a number", name);
    const double x = v->get<double>();
    if (!(x >= lo && x <= hi))
      invalid(std::string(name) + " must be between " + json(lo).dump() + " and " + json(hi).dump() + ", got " + v->dump(), name);
    return x;
  }
  std::optional<int64_t> integer(const char* name, int64_t lo, int64_t hi) const {
    const json* v = get(name);
    if (!v) return std::nullopt;
    if (!v->is_number_integer()) invalid(std::string(name) + " must be an integer", name);
    if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX))
      invalid(std::string(name) + " is out of range", name);
    const int64_t x = v->get<int64_t>();
    if (x < lo || x > hi)
      invalid(std::string(name) + " must be between " + std::to_string(lo) + " and " + std::to_string(hi) + ", got " +
                  std::to_string(x), name);
    return x;
  }
  std::optional<bool> boolean(const char* name) const {
    const json* v = get(name);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) invalid(std::string(name) + " must be true or false", name);
    return v->get<bool>();
  }
  std::optional<std::string> string(const char* name) const {
    const json* v = get(name);
    if (!v) return std::nullopt;
    if (!v->is_string()) invalid(std::string(name) + " must be a string", name);
    return v->get<std::string>();
  }
};

void reject_unknown(const json& body, std::initializer_list<const char*> known) {
  for (auto it = body.begin(); it != body.end(); ++it)
    if (std::none_of(known.begin(), known.end(), [&](const char* k) { return it.key() == k; }))
      invalid("Unrecognized request argument supplied: " + it.key(), it.key());
}

std::vector<int32_t> token_ids(const json& array, const ServedModel& model, const char* param) {
  std::vector<int32_t> ids;
  for (const json& t : array) {
    if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= model.tokenizer->vocab_size())
      invalid(std::string(param) + ": token ids must be integers in [0, " + std::to_string(model.tokenizer->vocab_size()) + ")", param);
    ids.push_back(int32_t(t.get<int64_t>()));
  }
  return ids;
}

// completions' prompt: a string, token ids, or a list of one of either.
std::vector<int32_t> completion_prompt(const json& body, const ServedModel& model) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) invalid("prompt is required", "prompt");
  json prompt = *it;
  if (prompt.is_array() && prompt.size() == 1 && (prompt[0].is_string() || prompt[0].is_array())) prompt = prompt[0];
  if (prompt.is_string()) return model.tokenizer->encode(prompt.get<std::string>(), /*add_special_tokens=*/true);
  if (prompt.is_array() && !prompt.empty() && std::all_of(prompt.begin(), prompt.end(), [](const json& t) { return t.is_number(); }))
    return token_ids(prompt, model, "prompt");
  invalid("prompt must be a string or a list of token ids (one prompt per request)", "prompt");
}

std::vector<std::string> stop_strings(const Fields& f) {
  const json* v = f.get("stop");
  if (!v) return {};
  std::vector<std::string> stops;
  if (v->is_string()) {
    stops.push_back(v->get<std::string>());
  } else if (v->is_array() && v->size() <= 4 && std::all_of(v->begin(), v->end(), [](const json& s) { return s.is_string(); })) {
    for (const json& s : *v) stops.push_back(s.get<std::string>());
  } else {
    invalid("stop must be a string or a list of at most 4 strings", "stop");
  }
  for (const std::string& s : stops)
    if (s.empty()) invalid("stop strings must not be empty", "stop");
  return stops;
}

// Fields both endpoints share: sampling, limits, streaming.
void read_common(const Fields& f, const ServedModel& model, int64_t default_max_tokens, ApiRequest& r) {
  if (auto m = f.string("model")) r.model = *m;
  SamplingParams& s = r.job.options.sampling;
  s.do_sample = true;  // OpenAI samples at temperature 1 unless asked otherwise
  if (auto t = f.number("temperature", 0, 2)) s.temperature = float(*t);
  if (s.temperature == 0) s.do_sample = false;
  if (auto p = f.number("top_p", 1e-9, 1)) s.top_p = float(*p);
  if (auto k = f.integer("top_k", -1, INT32_MAX)) s.top_k = int(std::max<int64_t>(*k, 0));  // vLLM's -1: off
  if (auto p = f.number("min_p", 0, 1)) s.min_p = float(*p);
  if (auto p = f.number("repetition_penalty", 1e-6, 100)) s.repetition_penalty = float(*p);
  if (auto p = f.number("presence_penalty", -2, 2)) s.presence_penalty = float(*p);
  if (auto p = f.number("frequency_penalty", -2, 2)) s.frequency_penalty = float(*p);
  if (auto seed = f.integer("seed", INT64_MIN, INT64_MAX)) {
    s.seed = uint64_t(*seed);
  } else {
    s.seed = std::random_device{}() | uint64_t(std::random_device{}()) << 32;
  }
  if (auto n = f.integer("n", 1, model.max_n)) r.job.n = int(*n);
  if (const json* bias = f.get("logit_bias"); bias && !(bias->is_object() && bias->empty()))
    invalid("logit_bias is not supported", "logit_bias");
  r.job.options.stop_strings = stop_strings(f);
  f.string("user");

  r.stream = f.boolean("stream").value_or(false);
  if (const json* options = f.get("stream_options")) {
    if (!r.stream) invalid("stream_options is only allowed when stream is true", "stream_options");
    if (!options->is_object()) invalid("stream_options must be an object", "stream_options");
    reject_unknown(*options, {"include_usage", "continuous_usage_stats"});
    r.include_usage = Fields{*options}.boolean("include_usage").value_or(false);
  }

  const int64_t prompt = int64_t(r.job.prompt.size()), context = model.context_length;
  if (prompt == 0) invalid("the prompt is empty", "prompt");
  if (prompt >= context)
    invalid("This model's maximum context length is " + std::to_string(context) + " tokens. However, your prompt has " +
                std::to_string(prompt) + " tokens, which leaves no room to generate.", "prompt");
  // Both are validated; the newer max_completion_tokens wins when a client sends the two.
  const auto max_completion_tokens = f.integer("max_completion_tokens", 1, context);
  const auto legacy_max_tokens = f.integer("max_tokens", 1, context);
  const auto max_tokens = max_completion_tokens ? max_completion_tokens : legacy_max_tokens;
  const int64_t generate = max_tokens.value_or(std::min(default_max_tokens, context - prompt));
  if (prompt + generate > context)
    invalid("This model's maximum context length is " + std::to_string(context) + " tokens. However, you requested " +
                std::to_string(prompt + generate) + " tokens (" + std::to_string(prompt) + " in the prompt, " +
                std::to_string(generate) + " for the completion).", max_tokens ? "max_tokens" : "prompt");
  r.job.options.max_new_tokens = int(generate);
  try {
    validate(s, "sampling");
  } catch (const Error& e) {
    invalid(e.what());
  }
}

// A request body: a JSON object, or ApiError.
json parse_body(const std::string& body_text) {
  json body;
  try {
    body = json::parse(body_text);
  } catch (const json::exception& e) {
    invalid(std::string("the body is not valid JSON: ") + e.what());
  }
  if (!body.is_object()) invalid("the body must be a JSON object");
  return body;
}

std::string token_bytes(const Tokenizer& tokenizer, int32_t id) {
  std::string bytes;
  tokenizer.append_token_bytes(id, /*skip_special_tokens=*/false, bytes);
  return bytes;
}

json bytes_json(const std::string& bytes) {
  json out = json::array();
  for (unsigned char c : bytes) out.push_back(int(c));
  return out;
}

}  // namespace

std::string token_text(const Tokenizer& tokenizer, int32_t id) {
  std::string text;
  append_utf8_lossy(token_bytes(tokenizer, id), text);
  return text;
}

json error_body(int status, const std::string& message, const std::string& param, const std::string& type) {
  return {{"error",
           {{"message", message}, {"type", type}, {"param", param.empty() ? json(nullptr) : json(param)}, {"code", status}}}};
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string render_chat(const json& messages, const ServedModel& model) {
  if (!model.chat_template) invalid("this model has no chat template; use /v1/completions", "messages");
  if (!messages.is_array() || messages.empty()) invalid("messages must be a non-empty list", "messages");
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const json& m : messages) {
    if (!m.is_object()) invalid("each message must be an object", "messages");
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) invalid("each message needs a string role", "messages");
    static const char* kRoles[] = {"system", "developer", "user", "assistant", "tool"};
    if (std::none_of(std::begin(kRoles), std::end(kRoles), [&](const char* r) { return *role == r; }))
      invalid("unknown message role " + role->dump(), "messages");
    nlohmann::ordered_json message = nlohmann::ordered_json::parse(m.dump());
    auto content = m.find("content");
    if (content == m.end() || content->is_null()) {
      if (*role != "assistant") invalid("a " + role->get<std::string>() + " message needs content", "messages");
      message["content"] = "";
    } else if (content->is_array()) {  // content parts: text only, joined
      std::string text;
      for (const json& part : *content) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
          invalid("only text content parts are supported", "messages");
        text += part["text"].get<std::string>();
      }
      message["content"] = text;
    } else if (!content->is_string()) {
      invalid("message content must be a string or a list of text parts", "messages");
    }
    list.push_back(std::move(message));
  }
  try {
    return model.chat_template->render(chat_template_context(list, nullptr, /*add_generation_prompt=*/true));
  } catch (const Error& e) {
    invalid(std::string("the chat template rejected the messages: ") + e.what(), "messages");
  }
}

ApiRequest parse_request(Endpoint endpoint, const std::string& body_text, const ServedModel& model) {
  const json body = parse_body(body_text);
  const Fields f{body};
  ApiRequest r;
  r.endpoint = endpoint;
  r.job.options.eos_token_ids = model.eos_token_ids;
  if (endpoint == Endpoint::Completions) {
    reject_unknown(body, {"model", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
                          "stream_options", "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty",
                          "best_of", "logit_bias", "seed", "suffix", "user", "top_k", "min_p", "repetition_penalty"});
    r.job.prompt = completion_prompt(body, model);
    read_common(f, model, 16, r);  // OpenAI's default max_tokens for completions
    if (auto lp = f.integer("logprobs", 0, 20)) r.job.top_logprobs = int(*lp);
    if (f.boolean("echo").value_or(false)) invalid("echo is not supported", "echo");
    if (f.get("suffix")) invalid("suffix is not supported", "suffix");
    if (auto best_of = f.integer("best_of", 1, model.max_n); best_of && *best_of != r.job.n)
      invalid("best_of must equal n (afm returns every choice it generates)", "best_of");
  } else {
    reject_unknown(body, {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                          "stream", "stream_options", "stop", "presence_penalty", "frequency_penalty", "logprobs",
                          "top_logprobs", "logit_bias", "seed", "user", "top_k", "min_p", "repetition_penalty",
                          "response_format", "tools", "tool_choice", "parallel_tool_calls", "store", "metadata",
                          "service_tier"});
    auto messages = body.find("messages");
    if (messages == body.end()) invalid("messages is required", "messages");
    r.job.prompt = model.tokenizer->encode(render_chat(*messages, model), /*add_special_tokens=*/false);
    for (int32_t id : model.end_of_turn_token_ids) r.job.options.eos_token_ids.push_back(id);
    read_common(f, model, model.context_length, r);  // chat: up to the rest of the context
    const bool logprobs = f.boolean("logprobs").value_or(false);
    auto top = f.integer("top_logprobs", 0, 20);
    if (top && !logprobs) invalid("top_logprobs requires logprobs to be true", "top_logprobs");
    if (logprobs) r.job.top_logprobs = int(top.value_or(0));
    if (const json* format = f.get("response_format"); format && !(format->is_object() && format->value("type", "") == "text"))
      invalid("only response_format {\"type\": \"text\"} is supported", "response_format");
    if (const json* tools = f.get("tools"); tools && !(tools->is_array() && tools->empty()))
      invalid("tools are not supported", "tools");
    if (const json* choice = f.get("tool_choice"); choice && *choice != "none") invalid("tool_choice is not supported", "tool_choice");
  }
  return r;
}

namespace {

json tokenize(const json& body, const ServedModel& model) {
  std::vector<int32_t> ids;
  const bool with_pieces = body.value("with_pieces", false);
  if (body.contains("messages")) {
    ids = model.tokenizer->encode(render_chat(body["messages"], model), false);
  } else {
    if (!body.contains("content") || !body["content"].is_string()) invalid("content must be a string", "content");
    if (body.contains("add_special") && !body["add_special"].is_boolean())
      invalid("add_special must be true or false", "add_special");
    ids = model.tokenizer->encode(body["content"].get<std::string>(), body.value("add_special", false));
  }
  json tokens = json::array();
  for (int32_t id : ids) {
    if (!with_pieces) {
      tokens.push_back(id);
      continue;
    }
    tokens.push_back({{"id", id}, {"piece", token_text(*model.tokenizer, id)}});
  }
  return {{"tokens", tokens}};
}

json detokenize(const json& body, const ServedModel& model) {
  if (!body.contains("tokens") || !body["tokens"].is_array()) invalid("tokens must be a list of token ids", "tokens");
  return {{"content", model.tokenizer->decode(token_ids(body["tokens"], model, "tokens"), /*skip_special_tokens=*/false)}};
}

json apply_template(const json& body, const ServedModel& model) {
  if (!body.contains("messages")) invalid("messages is required", "messages");
  return {{"prompt", render_chat(body["messages"], model)}};
}

}  // namespace

json utility_response(Utility utility, const std::string& body_text, const ServedModel& model) {
  const json body = parse_body(body_text);
  if (utility == Utility::Tokenize) return tokenize(body, model);
  if (utility == Utility::Detokenize) return detokenize(body, model);
  return apply_template(body, model);
}

ResponseWriter::ResponseWriter(const ApiRequest& request, const ServedModel& model)
    : endpoint_(request.endpoint),
      model_(model),
      id_(random_id(request.endpoint == Endpoint::Chat ? "chatcmpl-" : "cmpl-")),
      model_name_(request.model.empty() ? model.name : request.model),
      created_(std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count()),
      include_usage_(request.include_usage),
      n_(request.job.n),
      top_logprobs_(request.job.top_logprobs),
      role_sent_(size_t(request.job.n), false),
      choices_(size_t(request.job.n)) {}

json ResponseWriter::logprobs_json(const ChoiceDelta& d, int64_t text_offset) const {
  if (!d.logprobs) return nullptr;
  const Tokenizer& tok = *model_.tokenizer;
  const StepLogprobs& lp = *d.logprobs;
  if (endpoint_ == Endpoint::Completions) {
    json top = json::object();
    for (const TokenLogprob& t : lp.top) top[token_text(tok, t.id)] = t.logprob;
    return {{"tokens", {token_text(tok, lp.chosen.id)}},
            {"token_logprobs", {lp.chosen.logprob}},
            {"top_logprobs", {top}},
            {"text_offset", {text_offset}}};
  }
  json top = json::array();
  for (const TokenLogprob& t : lp.top) {
    const std::string bytes = token_bytes(tok, t.id);
    top.push_back({{"token", token_text(tok, t.id)}, {"logprob", t.logprob}, {"bytes", bytes_json(bytes)}});
  }
  const std::string bytes = token_bytes(tok, lp.chosen.id);
  return {{"content", {{{"token", token_text(tok, lp.chosen.id)}, {"logprob", lp.chosen.logprob}, {"bytes", bytes_json(bytes)},
                        {"top_logprobs", top}}}}};
}

json ResponseWriter::chunk(json choices) const {
  json c = {{"id", id_},
            {"object", endpoint_ == Endpoint::Chat ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", model_name_},
            {"choices", std::move(choices)}};
  if (include_usage_) c["usage"] = nullptr;
  return c;
}

std::string ResponseWriter::chunks(const std::vector<ChoiceDelta>& deltas) {
  std::string out;
  for (const ChoiceDelta& d : deltas) {
    Choice& choice = choices_[size_t(d.index)];
    json c = {{"index", d.index}, {"logprobs", logprobs_json(d, int64_t(choice.text.size()))},
              {"finish_reason", d.finish_reason.empty() ? json(nullptr) : json(d.finish_reason)}};
    choice.text += d.text;
    if (endpoint_ == Endpoint::Completions) {
      c["text"] = d.text;
    } else {
      json delta = json::object();
      if (!role_sent_[size_t(d.index)]) delta["role"] = "assistant";
      role_sent_[size_t(d.index)] = true;
      if (!d.text.empty() || delta.contains("role")) delta["content"] = d.text;
      c["delta"] = std::move(delta);
    }
    out += "data: " + dump(chunk(json::array({std::move(c)}))) + "\n\n";
  }
  return out;
}

std::string ResponseWriter::final_chunks(const Usage& usage) {
  std::string out;
  if (include_usage_) {
    json c = chunk(json::array());
    c["usage"] = usage_json(usage);
    out += "data: " + dump(c) + "\n\n";
  }
  return out + "data: [DONE]\n\n";
}

void ResponseWriter::collect(const std::vector<ChoiceDelta>& deltas) {
  for (const ChoiceDelta& d : deltas) {
    Choice& choice = choices_[size_t(d.index)];
    if (d.logprobs) {
      const json lp = logprobs_json(d, int64_t(choice.text.size()));
      if (choice.logprobs.is_null()) {
        choice.logprobs = lp;
      } else {
        for (auto it = lp.begin(); it != lp.end(); ++it)
          for (const json& item : it.value()) choice.logprobs[it.key()].push_back(item);
      }
    }
    choice.text += d.text;
    if (!d.finish_reason.empty()) choice.finish_reason = d.finish_reason;
  }
}

json ResponseWriter::response(const Usage& usage) const {
  json choices = json::array();
  for (int i = 0; i < n_; i++) {
    const Choice& c = choices_[size_t(i)];
    json logprobs = c.logprobs;
    if (top_logprobs_ >= 0 && logprobs.is_null())  // asked for, but no token had any (all eos)
      logprobs = endpoint_ == Endpoint::Chat ? json{{"content", json::array()}}
                                             : json{{"tokens", json::array()}, {"token_logprobs", json::array()},
                                                    {"top_logprobs", json::array()}, {"text_offset", json::array()}};
    json choice = {{"index", i}, {"logprobs", logprobs}, {"finish_reason", c.finish_reason}};
    if (endpoint_ == Endpoint::Chat)
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    else
      choice["text"] = c.text;
    choices.push_back(std::move(choice));
  }
  return {{"id", id_},
          {"object", endpoint_ == Endpoint::Chat ? "chat.completion" : "text_completion"},
          {"created", created_},
          {"model", model_name_},
          {"choices", std::move(choices)},
          {"usage", usage_json(usage)}};
}

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

}  // namespace afm::server
