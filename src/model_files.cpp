#include "model_files.h"

#include <filesystem>
#include <fstream>
#include <string_view>

#include "error.h"
#include "gguf_model.h"

namespace afm {

namespace fs = std::filesystem;

bool is_gguf_path(const std::string& path) {
  if (fs::is_directory(path)) return false;
  if (path.ends_with(".gguf")) return true;  // even when missing: then opening it says so
  std::ifstream file(path, std::ios::binary);
  char magic[4] = {};
  return file.read(magic, 4) && std::string_view(magic, 4) == "GGUF";
}

static std::string in_folder(const std::string& dir, const char* name) {
  if (!fs::is_directory(dir)) throw Error("model not found: " + dir + " (expected an HF model folder or a .gguf file)");
  return (fs::path(dir) / name).string();
}

Tokenizer load_model_tokenizer(const std::string& model_path) {
  if (is_gguf_path(model_path)) return Tokenizer::from_json(gguf_tokenizer_json(GGUFFile::open(model_path)), model_path);
  return Tokenizer::load(in_folder(model_path, "tokenizer.json"));
}

ChatTemplate load_model_chat_template(const std::string& model_path) {
  if (is_gguf_path(model_path)) {
    GGUFChatTemplate t = gguf_chat_template(GGUFFile::open(model_path));
    try {
      return ChatTemplate::parse(t.source, std::move(t.bos_token), std::move(t.eos_token));
    } catch (const Error& e) {
      throw Error(model_path + ": tokenizer.chat_template: " + e.what());
    }
  }
  return ChatTemplate::from_tokenizer_config(in_folder(model_path, "tokenizer_config.json"));
}

GenerationConfig load_model_generation_config(const std::string& model_path, const ModelTokenIds& model_ids) {
  // A GGUF carries no generation_config.json: HF's defaults with the model's special ids.
  if (is_gguf_path(model_path)) return load_generation_config("", model_ids);
  return load_generation_config(in_folder(model_path, "generation_config.json"), model_ids);
}

std::vector<int32_t> end_of_turn_token_ids(const Tokenizer& tokenizer) {
  std::vector<int32_t> ids;
  for (const char* end_of_turn : {"<|im_end|>", "<|eot_id|>"})
    if (auto id = tokenizer.token_id(end_of_turn)) ids.push_back(*id);
  return ids;
}

}  // namespace afm
