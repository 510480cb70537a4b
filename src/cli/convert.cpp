// afm convert: an HF checkpoint folder with its matmul weights already in a reduced format, so a
// later load maps them as they are (zero copy) instead of converting at every start. The folder
// stays an HF folder: the same config, tokenizer and generation files, safetensors shards and
// index; packed rows carry the dtype AFM_BFP8 or AFM_BFP4 (blockfloat.h's row layout).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>

#include "cli/checkpoint_folder.h"
#include "cli/common.h"
#include "error.h"

namespace afm::cli {

namespace {

namespace fs = std::filesystem;

struct ConvertFlags {
  std::string in, out, weights = "bfp8";
  std::string shard_size = "5GB";
  bool force = false;
};

DType packed_dtype(WeightFormat format) {
  switch (format) {
    case WeightFormat::BF16: return DType::BF16;
    case WeightFormat::BFP8: return DType::BFP8;
    case WeightFormat::BFP4: return DType::BFP4;
    default: throw Error("afm convert writes bf16, bfp8 or bfp4 (f32 keeps the checkpoint as it is)");
  }
}

// In the Llama layout every matrix but the embedding (a row lookup, kept exact) is a matmul weight.
bool is_matmul_weight(const TensorView& t) { return t.shape.size() == 2 && t.name != "model.embed_tokens.weight"; }

void run(const ConvertFlags& flags) {
  if (is_gguf_path(flags.in)) throw Error("afm convert reads HF checkpoint folders; a GGUF file loads as it is");
  const WeightFormat format = parse_weight_format(flags.weights);
  const DType dtype = packed_dtype(format);
  const ModelConfig config = load_config((fs::path(flags.in) / "config.json").string());
  const Checkpoint checkpoint = Checkpoint::open(flags.in);

  // Each output tensor, from which input tensor, and whether it is converted. A tied lm_head is
  // the embedding converted: stored as its own tensor, which the loader then prefers, so the
  // embedding itself stays exact.
  struct Source {
    const TensorView* view;
    bool convert;
  };
  std::map<std::string, Source> sources;
  for (const auto& [name, view] : checkpoint.tensors()) sources[name] = {&view, is_matmul_weight(view)};
  if (config.tie_word_embeddings && !checkpoint.contains("lm_head.weight") && checkpoint.contains("model.embed_tokens.weight"))
    sources["lm_head.weight"] = {&checkpoint.get("model.embed_tokens.weight"), true};
  std::vector<TensorEntry> entries;
  for (const auto& [name, source] : sources)
    entries.push_back({name, source.convert ? dtype : source.view->dtype, source.view->shape});
  const auto shards = split_into_shards(entries, parse_byte_size(flags.shard_size));
  uint64_t total_bytes = 0;
  for (const TensorEntry& t : entries) total_bytes += uint64_t(t.nbytes());

  CheckpointFolder folder(flags.out, flags.force);
  folder.check_space(total_bytes);
  const auto start = std::chrono::steady_clock::now();
  for (const char* name : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "chat_template.jinja"})
    if (fs::exists(fs::path(flags.in) / name)) folder.write_text(name, read_file((fs::path(flags.in) / name).string()));
  const auto progress = progress_bar("converting to " + flags.weights, "tensors");
  int64_t done = 0;
  folder.write_shards(shards, [&](SafetensorsWriter& file, const TensorEntry& t) {
    const Source& source = sources.at(t.name);
    if (source.convert) {
      const Weight w = make_weight(*source.view, format);  // the same conversion as at load
      file.append(w.data, uint64_t(w.bytes()));
    } else {
      file.append(source.view->data, uint64_t(source.view->nbytes));
    }
    if (progress) progress(++done, int64_t(entries.size()));
  });
  folder.commit();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%swrote %s: %s matmul weights, %.1f MB in %zu shard%s, in %.1f s\n", progress_line_end(),
               folder.out().c_str(), flags.weights.c_str(), double(total_bytes) / 1e6, shards.size(),
               shards.size() > 1 ? "s" : "", seconds);
}

}  // namespace

void add_convert_command(CLI::App& app) {
  auto flags = std::make_shared<ConvertFlags>();
  CLI::App* cmd = app.add_subcommand(
      "convert",
      "write an HF checkpoint folder whose matmul weights are already bf16, bfp8 or bfp4, so that loading it with "
      "the same --weights maps them without converting (the embedding and norms stay as they are)");
  cmd->add_option("in", flags->in, "the HF checkpoint folder to convert")->required();
  cmd->add_option("out", flags->out, "the folder to write (must be empty or missing)")->required();
  cmd->add_option("--weights", flags->weights, "bf16, bfp8 or bfp4")->capture_default_str();
  cmd->add_option("--shard-size", flags->shard_size, "largest shard, as transformers' max_shard_size (5GB, 200MB)")
      ->capture_default_str();
  cmd->add_flag("--force", flags->force, "replace a non-empty output folder");
  cmd->callback([flags] { run(*flags); });
}

}  // namespace afm::cli
