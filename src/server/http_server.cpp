#include "server/http_server.h"

#include <pthread.h>
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "error.h"
#include "model_files.h"
#include "server/metrics.h"
#include "openapi_json.h"
#include "server/openai_api.h"

namespace afm::server {

using json = nlohmann::json;

namespace {

constexpr auto kPoll = std::chrono::milliseconds(100);  // how often a waiting stream checks its client

sigset_t termination_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

void send_error(httplib::Response& res, int status, const std::string& message, const std::string& param = {},
                const std::string& type = "invalid_request_error") {
  res.status = status;
  res.set_content(dump(error_body(status, message, param, type)), "application/json");
}

const char* error_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable";
  }
  return status >= 500 ? "server_error" : "invalid_request_error";
}

class Server {
 public:
  Server(Model& model, const Tokenizer& tokenizer, const ChatTemplate* chat_template, std::vector<int32_t> eos_token_ids,
         const ServerOptions& options)
      : options_(options),
        served_{options.model_name, &tokenizer, chat_template, std::move(eos_token_ids), end_of_turn_token_ids(tokenizer),
                model.max_seq_len(), options.max_n},
        scheduler_(model, tokenizer, options.scheduler, metrics_) {
    routes();
  }

  int run() {
    const int port = options_.port == 0 ? http_.bind_to_any_port(options_.host)
                                        : (http_.bind_to_port(options_.host, options_.port) ? options_.port : -1);
    if (port < 0) throw Error("cannot listen on " + options_.host + ":" + std::to_string(options_.port) +
                              " (in use, or not an address of this machine)");
    std::printf("afm serve: listening on http://%s:%d\n", options_.host.c_str(), port);
    std::fflush(stdout);
    std::thread signals([this] { wait_for_termination(); });
    const bool ok = http_.listen_after_bind();
    listener_done_ = true;
    if (!stopping_) pthread_kill(signals.native_handle(), SIGTERM);  // the listener died: end the signal thread too
    signals.join();
    return ok || stopping_ ? 0 : 1;
  }

 private:
  void wait_for_termination() {
    const sigset_t set = termination_signals();
    int signal = 0;
    sigwait(&set, &signal);
    stopping_ = true;
    std::fprintf(stderr, "afm serve: %s: refusing new requests, finishing the running ones\n",
                 signal == SIGINT ? "SIGINT" : "SIGTERM");
    scheduler_.drain();
    // The engine is done; let the handlers write what it produced (httplib stops writing
    // responses once stopped), waiting at most a minute for slow clients.
    {
      std::unique_lock lock(responses_mutex_);
      responses_done_.wait_for(lock, std::chrono::minutes(1), [&] { return responses_in_flight_ == 0; });
    }
    // stop() does nothing before listen_after_bind() has started running, which a signal right
    // after the "listening" line can beat: keep asking until the listener has returned.
    while (!listener_done_) {
      http_.stop();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  // Counts a generation response from its request's admission until httplib has written it
  // (the content provider's releaser runs when the response is gone).
  void response_started() {
    std::lock_guard lock(responses_mutex_);
    responses_in_flight_++;
  }
  void response_written() {
    std::lock_guard lock(responses_mutex_);
    if (--responses_in_flight_ == 0) responses_done_.notify_all();
  }

  // With --api-key, every endpoint but /health and /metrics (which do not call this) needs it.
  bool authorized(const httplib::Request& req, httplib::Response& res) const {
    if (options_.api_key.empty() || req.get_header_value("Authorization") == "Bearer " + options_.api_key) return true;
    send_error(res, 401, "a valid API key is required: Authorization: Bearer KEY", {}, "authentication_error");
    return false;
  }

  void routes() {
    const size_t threads = size_t(options_.scheduler.max_batch + options_.scheduler.max_queue) + 8;
    http_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    http_.set_payload_max_length(options_.max_body_bytes);
    // httplib's own refusals (404, 413, 400 on a malformed request line) get OpenAI's error shape;
    // a path asked with a method it does not have gets 405 and Allow (RFC 9110), not 404.
    http_.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      const auto route = allowed_methods_.find(req.path);
      const bool wrong_method = res.status == 404 && route != allowed_methods_.end();
      if (wrong_method) {
        res.status = 405;
        res.set_header("Allow", route->second);
      }
      const std::string message = wrong_method        ? req.path + " takes " + route->second + ", not " + req.method
                                  : res.status == 404 ? "no endpoint " + req.method + " " + req.path
                                  : res.status == 413 ? "the request body is too large"
                                                      : "the request was refused (HTTP " + std::to_string(res.status) + ")";
      send_error(res, res.status, message, {}, error_type(res.status));
    });
    http_.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr e) {
      std::string message = "internal error";
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        message += std::string(": ") + x.what();
      } catch (...) {
      }
      send_error(res, 500, message, {}, "server_error");
    });

    route("GET", "/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"status":"ok"})", "application/json");
    });
    route("GET", "/openapi.json", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(kOpenApiJson, sizeof kOpenApiJson - 1, "application/json");
    });
    route("GET", "/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics_.render(scheduler_.gauges()), "text/plain; version=0.0.4");
    });
    // The key is checked in the handlers, after httplib has read the body: refusing earlier
    // would leave the body unread on a keep-alive connection, to be taken for the next request.
    route("GET", "/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      if (!authorized(req, res)) return;
      json model = {{"id", served_.name}, {"object", "model"}, {"created", 0}, {"owned_by", "afm"},
                    {"max_model_len", served_.context_length}};
      res.set_content(dump({{"object", "list"}, {"data", {model}}}), "application/json");
    });
    route("POST", "/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      if (authorized(req, res)) generate(Endpoint::Completions, req, res);
    });
    route("POST", "/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      if (authorized(req, res)) generate(Endpoint::Chat, req, res);
    });
    route("POST", "/tokenize", [this](const httplib::Request& req, httplib::Response& res) { utility(req, res, Utility::Tokenize); });
    route("POST", "/detokenize", [this](const httplib::Request& req, httplib::Response& res) {
      utility(req, res, Utility::Detokenize);
    });
    route("POST", "/apply-template", [this](const httplib::Request& req, httplib::Response& res) {
      utility(req, res, Utility::ApplyTemplate);
    });
  }

  // Registers a handler, and its method as one the path allows.
  void route(const std::string& method, const std::string& path, httplib::Server::Handler handler) {
    if (method == "GET") http_.Get(path, std::move(handler));
    else http_.Post(path, std::move(handler));
    std::string& allowed = allowed_methods_[path];
    allowed += (allowed.empty() ? "" : ", ") + method;
  }

  // llama.cpp's utility endpoints: a JSON object in, a JSON object out.
  void utility(const httplib::Request& req, httplib::Response& res, Utility utility) {
    if (!authorized(req, res)) return;
    try {
      res.set_content(dump(utility_response(utility, req.body, served_)), "application/json");
    } catch (const ApiError& e) {
      metrics_.rejected(e.status);
      send_error(res, e.status, e.what(), e.param, e.type);
    } catch (const Error& e) {
      send_error(res, 400, e.what());
    } catch (const json::exception& e) {
      metrics_.rejected(400);
      send_error(res, 400, std::string("invalid request body: ") + e.what());
    }
  }

  void generate(Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
    std::shared_ptr<Request> request;
    std::shared_ptr<ResponseWriter> writer;
    try {
      ApiRequest api = parse_request(endpoint, req.body, served_);
      writer = std::make_shared<ResponseWriter>(api, served_);
      const bool stream = api.stream;
      response_started();  // before submit, so a drain cannot finish between the two
      try {
        request = scheduler_.submit(std::move(api.job));
      } catch (...) {
        response_written();
        throw;
      }
      if (stream) return start_stream(request, writer, res);
    } catch (const ApiError& e) {
      metrics_.rejected(e.status);
      return send_error(res, e.status, e.what(), e.param, e.type);
    } catch (const QueueFull& e) {
      metrics_.rejected(429);
      res.set_header("Retry-After", "1");
      return send_error(res, 429, e.what(), {}, "rate_limit_error");
    } catch (const Draining& e) {
      return send_error(res, 503, e.what(), {}, "service_unavailable");
    } catch (const Error& e) {  // a request the scheduler can never run
      metrics_.rejected(400);
      return send_error(res, 400, e.what());
    } catch (const json::exception& e) {  // a value of an unexpected JSON type deep in the body
      metrics_.rejected(400);
      return send_error(res, 400, std::string("invalid request body: ") + e.what());
    }
    std::vector<ChoiceDelta> deltas;
    while (request->next(deltas, kPoll)) writer->collect(deltas);
    const bool failed = !request->error().empty();
    auto body = std::make_shared<std::string>(dump(failed ? error_body(500, request->error(), {}, "server_error")
                                                          : writer->response(request->usage())));
    if (failed) res.status = 500;
    res.set_content_provider(
        body->size(), "application/json",
        [body](size_t offset, size_t length, httplib::DataSink& sink) { return sink.write(body->data() + offset, length); },
        [this](bool) { response_written(); });
  }

  // Server-sent events: one chunk per delta, then usage (if asked) and [DONE]. A client that
  // goes away cancels its request at the next write or poll, which frees its blocks.
  void start_stream(std::shared_ptr<Request> request, std::shared_ptr<ResponseWriter> writer, httplib::Response& res) {
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [request, writer](size_t, httplib::DataSink& sink) {
          std::vector<ChoiceDelta> deltas;
          const bool more = request->next(deltas, kPoll);
          std::string out = writer->chunks(deltas);
          if (!more) {
            const std::string error = request->error();
            out += error.empty() ? writer->final_chunks(request->usage())
                                 : "data: " + dump(error_body(500, error, {}, "server_error")) + "\n\ndata: [DONE]\n\n";
          }
          // An idle poll writes an SSE comment (clients skip it): a client that has gone away then
          // fails a write within a poll or two, even while its request waits or prefills.
          if (out.empty()) out = ": waiting\n\n";
          if (!sink.write(out.data(), out.size())) {
            request->cancel();
            return false;
          }
          if (!more) sink.done();
          return true;
        },
        [this, request](bool success) {
          if (!success) request->cancel();
          response_written();
        });
  }

  ServerOptions options_;
  Metrics metrics_;
  ServedModel served_;
  Scheduler scheduler_;
  httplib::Server http_;
  std::map<std::string, std::string> allowed_methods_;  // path -> "GET" or "POST", as Allow lists them
  std::atomic<bool> stopping_{false}, listener_done_{false};
  std::mutex responses_mutex_;
  std::condition_variable responses_done_;
  int64_t responses_in_flight_ = 0;
};

}  // namespace

void block_termination_signals() {
  const sigset_t set = termination_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int serve(Model& model, const Tokenizer& tokenizer, const ChatTemplate* chat_template, std::vector<int32_t> eos_token_ids,
          const ServerOptions& options) {
  Server server(model, tokenizer, chat_template, std::move(eos_token_ids), options);
  return server.run();
}

}  // namespace afm::server
