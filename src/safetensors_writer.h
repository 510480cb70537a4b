// Writing safetensors files as a stream, and splitting a checkpoint into shards as HF does.
// The header carries every tensor's offsets, so it goes first and the tensor bytes follow in
// pieces of any size: a file far larger than memory is written holding only one piece.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dtype.h"

namespace afm {

// One tensor as a safetensors header describes it.
struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  int64_t nbytes() const;
};

class SafetensorsWriter {
 public:
  // Creates `path` and writes the header; the data area then holds `tensors` packed in this order.
  SafetensorsWriter(const std::string& path, const std::vector<TensorEntry>& tensors);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  void append(const void* data, uint64_t size);  // the next bytes of the data area
  void finish();  // closes the file; afm::Error unless exactly every tensor's bytes were appended

 private:
  void write_all(const void* data, uint64_t size);
  std::string path_;
  int fd_ = -1;
  uint64_t data_size_ = 0, written_ = 0;
};

// transformers' save_pretrained sharding: tensors in order, a new shard whenever the next tensor
// would push the current one past max_shard_bytes; a tensor larger than that gets its own shard.
std::vector<std::vector<TensorEntry>> split_into_shards(const std::vector<TensorEntry>& tensors,
                                                        uint64_t max_shard_bytes);

// HF's file names: model.safetensors alone, or model-00001-of-00002.safetensors and so on.
std::string shard_file_name(size_t index, size_t count);

// model.safetensors.index.json for these shards (named by shard_file_name): weight_map and
// metadata.total_size, the sum of the tensors' bytes.
std::string shard_index_json(const std::vector<std::vector<TensorEntry>>& shards);

// "5GB", "200MB", "64KiB" or a plain byte count, with HF's units (KB = 1000 bytes, KiB = 1024).
uint64_t parse_byte_size(const std::string& text);

}  // namespace afm
