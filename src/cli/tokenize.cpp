// afm tokenize / detokenize: ids as one JSON array on stdout, for scripts and tests.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli/common.h"
#include "error.h"

namespace afm::cli {

namespace {

struct TokenizeFlags {
  TokenizerFlags tokenizer;
  bool no_special = false;
  std::string file, text;
};

struct DetokenizeFlags {
  TokenizerFlags tokenizer;
  bool skip_special = false;
  std::string file, ids;
};

void tokenize(const TokenizeFlags& flags) {
  Tokenizer tokenizer = flags.tokenizer.load();
  const std::string text = flags.file.empty() ? flags.text : read_file(flags.file);
  std::printf("%s\n", nlohmann::json(tokenizer.encode(text, !flags.no_special)).dump().c_str());
}

void detokenize(const DetokenizeFlags& flags) {
  Tokenizer tokenizer = flags.tokenizer.load();
  const std::string source = flags.file.empty() ? flags.ids : read_file(flags.file);
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
  auto* file = t->add_option("--file,-f", tok->file, "read the text from a file");
  auto* text = t->add_option("text", tok->text, "the text")->excludes(file);
  t->callback([tok, text] {
    if (text->count() == 0 && tok->file.empty()) throw Error("give the text, or --file FILE");
    tokenize(*tok);
  });

  auto detok = std::make_shared<DetokenizeFlags>();
  CLI::App* d = app.add_subcommand("detokenize", "print the text of a JSON array of token ids");
  detok->tokenizer.add_to(*d);
  d->add_flag("--skip-special", detok->skip_special, "leave special tokens out of the text");
  auto* dfile = d->add_option("--file,-f", detok->file, "read the ids from a file");
  auto* ids = d->add_option("ids", detok->ids, "the ids, e.g. [4096,791]")->excludes(dfile);
  d->callback([detok, ids] {
    if (ids->count() == 0 && detok->file.empty()) throw Error("give the ids as a JSON array, or --file FILE");
    detokenize(*detok);
  });
}

}  // namespace afm::cli
