// Writing an HF checkpoint folder (afm init, afm convert) so that it appears whole or not at all:
// everything goes into DIR.partial-XXXXXX, renamed to DIR by commit(); a folder that is not
// committed is removed, so an error never leaves one that looks like a complete checkpoint.
#pragma once
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "safetensors_writer.h"

namespace afm::cli {

class CheckpointFolder {
 public:
  // `out` must be missing or empty, unless `force` (then it is replaced at commit).
  CheckpointFolder(const std::string& out, bool force);
  ~CheckpointFolder();
  CheckpointFolder(const CheckpointFolder&) = delete;
  CheckpointFolder& operator=(const CheckpointFolder&) = delete;

  const std::filesystem::path& out() const { return out_; }
  void check_space(uint64_t bytes) const;  // afm::Error when the disk has less free
  void write_text(const std::string& name, const std::string& text) const;

  // The shards and, for more than one, their index. write_tensor streams each tensor's bytes
  // into the shard's writer (all of them, in order).
  void write_shards(const std::vector<std::vector<TensorEntry>>& shards,
                    const std::function<void(SafetensorsWriter& file, const TensorEntry& tensor)>& write_tensor) const;
  void commit();

 private:
  std::filesystem::path out_, partial_;
  bool committed_ = false;
};

}  // namespace afm::cli
