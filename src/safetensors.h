// Memory-mapped safetensors files and HF checkpoint folders (one file, or shards behind an index).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dtype.h"

namespace afm {

// A whole file mapped read-only; the mapping lives as long as `owner` has a holder.
struct MappedFile {
  const uint8_t* data = nullptr;
  uint64_t size = 0;
  std::shared_ptr<const void> owner;
};
MappedFile map_file(const std::string& path);  // afm::Error when missing or not a regular file

// A read-only view of one tensor inside a mapped file.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  int64_t nbytes = 0;
  std::shared_ptr<const void> owner;  // the mapping; keeps `data` valid
  bool file_mapped = false;           // data is a read-only mapping of a file (pages can be dropped)

  int64_t numel() const;
  std::string describe() const;  // "name [4104, 128] BF16"
  std::vector<float> to_f32() const;
  std::vector<int64_t> to_i64() const;
};

// One .safetensors file: the header is parsed and checked against the file size at open.
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  // The same checks on bytes already in memory; `path` only names them in errors.
  static SafetensorsFile parse(const MappedFile& mapped, const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const TensorView& get(const std::string& name) const;  // throws afm::Error naming the file
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

 private:
  std::string path_;
  std::map<std::string, TensorView> tensors_;
};

// An HF checkpoint folder: config.json plus model.safetensors or model.safetensors.index.json + shards.
class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir);
  // No files: a model built from it gets bf16 noise of whatever shapes it asks for (ones for
  // vectors), so a model's real shape can be benchmarked without its weights.
  static Checkpoint random(uint64_t seed);
  // Tensors from another file format, already named and shaped as in an HF checkpoint.
  static Checkpoint from_tensors(std::string source, std::map<std::string, TensorView> tensors);
  bool is_random() const { return random_seed_.has_value(); }
  std::optional<uint64_t> random_seed() const { return random_seed_; }

  const std::string& dir() const { return dir_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;

 private:
  std::string dir_;
  std::map<std::string, TensorView> tensors_;
  std::optional<uint64_t> random_seed_;
};

}  // namespace afm
