#include "cli/checkpoint_folder.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "error.h"

namespace afm::cli {

namespace fs = std::filesystem;

CheckpointFolder::CheckpointFolder(const std::string& out, bool force) {
  out_ = fs::path(out).lexically_normal();
  if (!out_.has_filename()) out_ = out_.parent_path();  // "DIR/"
  std::error_code ec;
  if (fs::exists(out_, ec)) {
    if (!fs::is_directory(out_)) throw Error(out_.string() + " exists and is not a folder");
    if (!fs::is_empty(out_) && !force) throw Error(out_.string() + " is not empty (--force replaces it)");
  }
  const fs::path parent = out_.parent_path().empty() ? fs::path(".") : out_.parent_path();
  fs::create_directories(parent, ec);
  if (ec) throw Error("cannot create " + parent.string() + ": " + ec.message());
  std::string pattern = (parent / (out_.filename().string() + ".partial-XXXXXX")).string();
  if (!mkdtemp(pattern.data())) throw Error("cannot write to " + parent.string() + ": " + std::strerror(errno));
  // mkdtemp makes it private (0700); a checkpoint folder gets the usual permissions.
  const mode_t mask = umask(0);
  umask(mask);
  chmod(pattern.c_str(), 0777 & ~mask);
  partial_ = pattern;
}

CheckpointFolder::~CheckpointFolder() {
  std::error_code ignored;
  if (!committed_) fs::remove_all(partial_, ignored);
}

void CheckpointFolder::check_space(uint64_t bytes) const {
  std::error_code ec;
  const fs::space_info space = fs::space(partial_, ec);
  if (!ec && space.available < bytes)
    throw Error(out_.string() + ": " + std::to_string(bytes / 1000000) + " MB of weights do not fit in the " +
                std::to_string(space.available / 1000000) + " MB free there");
}

void CheckpointFolder::write_text(const std::string& name, const std::string& text) const {
  std::ofstream file(partial_ / name, std::ios::binary);
  file << text;
  if (!file.flush()) throw Error("cannot write " + (partial_ / name).string());
}

void CheckpointFolder::write_shards(
    const std::vector<std::vector<TensorEntry>>& shards,
    const std::function<void(SafetensorsWriter& file, const TensorEntry& tensor)>& write_tensor) const {
  for (size_t i = 0; i < shards.size(); i++) {
    SafetensorsWriter file((partial_ / shard_file_name(i, shards.size())).string(), shards[i]);
    for (const TensorEntry& t : shards[i]) write_tensor(file, t);
    file.finish();
  }
  if (shards.size() > 1) write_text("model.safetensors.index.json", shard_index_json(shards));
}

void CheckpointFolder::commit() {
  if (fs::exists(out_)) fs::remove_all(out_);  // empty, or --force
  fs::rename(partial_, out_);
  committed_ = true;
}

}  // namespace afm::cli
