// Renders HuggingFace chat templates: the Jinja `chat_template` string in tokenizer_config.json.
// A small Jinja2-subset interpreter (lexer -> parser -> AST -> tree-walking evaluator) that follows
// HF's environment: trim_blocks, lstrip_blocks, loop controls, macros, raise_exception, strftime_now
// and dict. Anything it does not implement is an afm::Error naming the construct, never a silently
// wrong prompt; tests/test_chat_template_diff.cpp checks it against jinja2 on real templates.
// Rendering is bounded (nesting, macro recursion, steps, value, list and output size, and the bytes
// evaluated in all), so a hostile template ends in an error rather than a crash or a hang.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace afm {

struct ChatMessage {
  std::string role;
  std::string content;
};

// The variables transformers' apply_chat_template passes a template: `messages` (an array of
// message objects, each with its reasoning copied under every name templates read it by), `tools`
// (null when none), `documents` (null) and `add_generation_prompt`.
nlohmann::ordered_json chat_template_context(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                                             bool add_generation_prompt);

class ChatTemplate {
 public:
  // Throws afm::Error on syntax errors and on constructs the interpreter does not support.
  static ChatTemplate parse(const std::string& source);
  // A template with the special tokens it sees as bos_token and eos_token (absent: undefined).
  static ChatTemplate parse(const std::string& source, std::optional<std::string> bos_token,
                            std::optional<std::string> eos_token);
  // Reads chat_template (or a sibling chat_template.jinja), bos_token and eos_token.
  static ChatTemplate from_tokenizer_config(const std::string& tokenizer_config_json_path);

  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;
  // General form: every key of the JSON object `context` becomes a template variable
  // (messages, add_generation_prompt, tools, ...), overriding bos_token/eos_token from the config.
  // ordered_json because templates see dicts in insertion order, as Python does (tojson, loops).
  std::string render(const nlohmann::ordered_json& context) const;

  const std::optional<std::string>& bos_token() const { return bos_token_; }
  const std::optional<std::string>& eos_token() const { return eos_token_; }

 private:
  struct Program;  // parsed template, defined in chat_template.cpp
  std::shared_ptr<const Program> program_;
  std::optional<std::string> bos_token_;  // absent when the config has none: the template sees undefined
  std::optional<std::string> eos_token_;
};

}  // namespace afm
