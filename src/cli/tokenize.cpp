// afm tokenize / detokenize: ids as one JSON array on stdout, for scripts and tests.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "error.h"

namespace afm::cli {

namespace {

// Input given inline as a positional argument, or read from --file.
struct Input {
  std::string file, value;
  CLI::Option* positional = nullptr;

  void add_to(CLI::App& cmd, const std::string& name, const std::string& description) {
    auto* from_file = cmd.add_option("--file,-f", file, "read the " + name + " from a file");
    positional = cmd.add_option(name, value, description)->excludes(from_file);
  }
  std::string read(const std::string& missing) const {
    if (positional->count() == 0 && file.empty()) throw Error(missing);
    return file.empty() ? value : read_file(file);
  }
};

struct TokenizeFlags {
  TokenizerFlags tokenizer;
  bool no_special = false;
  Input text;
};

struct DetokenizeFlags {
  TokenizerFlags tokenizer;
  bool skip_special = false;
  Input ids;
};

void tokenize(const TokenizeFlags& flags) {
  Tokenizer tokenizer = flags.tokenizer.load();
  const std::string text = flags.text.read("give the text, or --file FILE");
  std::printf("%s\n", nlohmann::json(tokenizer.encode(text, !flags.no_special)).dump().c_str());
}

void detokenize(const DetokenizeFlags& flags) {
  Tokenizer tokenizer = flags.tokenizer.load();
  const std::string source = flags.ids.read("give the ids as a JSON array, or --file FILE");
  std::vector<int32_t> ids;
  try {
    ids = nlohmann::json::parse(source).get<std::vector<int32_t>>();
  } catch (const nlohmann::json::exception&) {
    throw Error("detokenize expects a JSON array of token ids, such as [4096, 791, 11]");
  }
  for (int32_t id : ids)
    if (id < 0 || id >= tokenizer.vocab_size())
      throw Error("token id " + std::to_string(id) + " is outside the vocabulary (" +
                  std::to_string(tokenizer.vocab_size()) + ")");
  const std::string text = tokenizer.decode(ids, flags.skip_special);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::printf("\n");
}

}  // namespace

void add_tokenize_commands(CLI::App& app) {
  auto tok = std::make_shared<TokenizeFlags>();
  CLI::App* t = app.add_subcommand("tokenize", "print the token ids of a text as a JSON array");
  tok->tokenizer.add_to(*t);
  t->add_flag("--no-special", tok->no_special, "do not add BOS or other special tokens");
  tok->text.add_to(*t, "text", "the text");
  t->callback([tok] { tokenize(*tok); });

  auto detok = std::make_shared<DetokenizeFlags>();
  CLI::App* d = app.add_subcommand("detokenize", "print the text of a JSON array of token ids");
  detok->tokenizer.add_to(*d);
  d->add_flag("--skip-special", detok->skip_special, "leave special tokens out of the text");
  detok->ids.add_to(*d, "ids", "the ids, e.g. [4096,791]");
  d->callback([detok] { detokenize(*detok); });
}

}  // namespace afm::cli
