// Chat templates: parse and render an arbitrary template, as a model's tokenizer_config.json can
// hold any. Input: the template source, then optionally a NUL byte and a JSON object with
// "messages", "tools" and "add_generation_prompt", as transformers' apply_chat_template passes them.
// Every failure must be an afm::Error; the renderer's bounds keep hostile templates from hanging.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "chat_template.h"
#include "error.h"

using json = nlohmann::ordered_json;

namespace {

// A short conversation for inputs that bring no context of their own.
const json& default_messages() {
  static const json messages = json::parse(R"([
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi!", "reasoning_content": "greet back"},
    {"role": "user", "content": "Bye"}])");
  return messages;
}

json context_of(std::string_view text) {
  json given = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!given.is_object()) return afm::chat_template_context(default_messages(), nullptr, true);
  auto field = [&](const char* name) { return given.contains(name) ? given[name] : json(); };
  const json generation = field("add_generation_prompt");
  return afm::chat_template_context(field("messages"), field("tools"), !generation.is_boolean() || generation.get<bool>());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t split = input.find('\0');
  const std::string source = input.substr(0, split);
  const json context = context_of(split == std::string::npos ? std::string_view() : std::string_view(input).substr(split + 1));
  try {
    afm::ChatTemplate::parse(source, "<s>", "</s>").render(context);
  } catch (const afm::Error&) {
  }
  return 0;
}
