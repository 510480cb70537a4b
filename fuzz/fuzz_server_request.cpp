// The server's request bodies, through the functions its handlers call, for the embedded model.
// The first byte picks the endpoint, the rest is the body. Every refusal must be one of the
// exceptions the handlers turn into a 400 (ApiError, afm::Error, a JSON type error); anything else
// would be a 500 or a crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "config.h"
#include "error.h"
#include "model_files.h"
#include "server/http_server.h"
#include "server/openai_api.h"

using namespace afm;
using namespace afm::server;

namespace {

const ServedModel* served;

// What the generation handlers do before submitting the job to the scheduler.
void generation_request(Endpoint endpoint, const std::string& body) {
  const ApiRequest request = parse_request(endpoint, body, *served);
  const ResponseWriter writer(request, *served);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string dir = AFM_DEFAULT_MODEL_DIR;
  static const Tokenizer tokenizer = load_model_tokenizer(dir);
  static const ChatTemplate chat_template = load_model_chat_template(dir);
  const ModelConfig config = load_config(dir + "/config.json");
  const GenerationConfig generation = load_model_generation_config(dir, ModelTokenIds{config.eos_token_ids, config.bos_token_id});
  // A short context (the model allows 64k), so that small bodies reach the context-length checks.
  static const ServedModel model{"afm-tiny-austen", &tokenizer, &chat_template, generation.eos_token_ids,
                                 end_of_turn_token_ids(tokenizer), /*context_length=*/256, ServerOptions{}.max_n};
  served = &model;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string body(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    switch (data[0] % 5) {
      case 0: generation_request(Endpoint::Completions, body); break;
      case 1: generation_request(Endpoint::Chat, body); break;
      case 2: utility_response(Utility::Tokenize, body, *served); break;
      case 3: utility_response(Utility::Detokenize, body, *served); break;
      case 4: utility_response(Utility::ApplyTemplate, body, *served); break;
    }
  } catch (const ApiError&) {
  } catch (const Error&) {
  } catch (const nlohmann::json::exception&) {
  }
  return 0;
}
