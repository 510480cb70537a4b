// afm template: prints the prompt a chat template renders for a conversation, byte for byte, so
// users can see what their model is fed (and tests can compare it with jinja2's).
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "error.h"

namespace afm::cli {

namespace {

struct TemplateFlags {
  std::string model = AFM_DEFAULT_MODEL_DIR;
  std::string template_file;
  std::string messages_file;
  std::string tools_file;
  bool add_generation_prompt = false;
  std::vector<std::string> vars;
};

nlohmann::ordered_json read_json(const std::string& path, const char* what) {
  try {
    return nlohmann::ordered_json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string(what) + " " + path + " is not valid JSON: " + e.what());
  }
}

void print_template(const TemplateFlags& flags) {
  ChatTemplate model_template = load_model_chat_template(flags.model);
  ChatTemplate chat = flags.template_file.empty()
                          ? model_template
                          : ChatTemplate::parse(read_file(flags.template_file), model_template.bos_token(),
                                                model_template.eos_token());

  nlohmann::ordered_json messages = read_json(flags.messages_file, "--messages");
  if (!messages.is_array()) throw Error("--messages " + flags.messages_file + " must hold a JSON array of messages");
  for (const auto& message : messages)
    if (!message.is_object()) throw Error("--messages: every message must be a JSON object, got " + message.dump());
  nlohmann::ordered_json tools = nullptr;
  if (!flags.tools_file.empty()) {
    tools = read_json(flags.tools_file, "--tools");
    if (!tools.is_array()) throw Error("--tools " + flags.tools_file + " must hold a JSON array");
  }
  nlohmann::ordered_json context = chat_template_context(messages, tools, flags.add_generation_prompt);
  for (const std::string& var : flags.vars) {
    size_t eq = var.find('=');
    if (eq == std::string::npos || eq == 0) throw Error("--var takes KEY=JSON, got '" + var + "'");
    try {
      context[var.substr(0, eq)] = nlohmann::ordered_json::parse(var.substr(eq + 1));
    } catch (const nlohmann::json::exception&) {
      throw Error("--var " + var.substr(0, eq) + ": the value is not JSON (quote strings: KEY='\"text\"')");
    }
  }
  std::string prompt = chat.render(context);
  std::fwrite(prompt.data(), 1, prompt.size(), stdout);
}

}  // namespace

void add_template_command(CLI::App& app) {
  auto flags = std::make_shared<TemplateFlags>();
  CLI::App* cmd = app.add_subcommand("template", "print the prompt a chat template renders for a conversation");
  cmd->add_option("--model,-m", flags->model, "HF model folder or GGUF file (default: the embedded model)");
  cmd->add_option("--template", flags->template_file, "a .jinja file to use instead of the model's template");
  cmd->add_option("--messages", flags->messages_file, "a JSON array of messages")->required();
  cmd->add_option("--tools", flags->tools_file, "a JSON array of tool schemas");
  cmd->add_flag("--add-generation-prompt", flags->add_generation_prompt, "end with the assistant turn's header");
  cmd->add_option("--var", flags->vars, "an extra template variable, KEY=JSON (repeatable)");
  cmd->callback([flags] { print_template(*flags); });
}

}  // namespace afm::cli
