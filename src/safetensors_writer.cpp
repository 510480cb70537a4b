#include "safetensors_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "error.h"

namespace afm {

using json = nlohmann::json;

int64_t TensorEntry::nbytes() const {
  int64_t n = dtype_row_bytes(dtype, shape.empty() ? 1 : shape.back());
  for (size_t i = 0; i + 1 < shape.size(); i++) n *= shape[i];
  return n;
}

SafetensorsWriter::SafetensorsWriter(const std::string& path, const std::vector<TensorEntry>& tensors) : path_(path) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  for (const TensorEntry& t : tensors) {
    const uint64_t begin = data_size_;
    data_size_ += uint64_t(t.nbytes());
    if (!header.emplace(t.name, json{{"dtype", dtype_name(t.dtype)}, {"shape", t.shape},
                                     {"data_offsets", {begin, data_size_}}}).second)
      throw Error(path + ": tensor " + t.name + " given twice");
  }
  // Padded with spaces to a multiple of 8 bytes, as the safetensors library does, so the data
  // area starts aligned for every dtype.
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw Error("cannot create " + path + ": " + std::strerror(errno));
  const uint64_t header_size = text.size();  // little-endian, as on every host afm builds for
  write_all(&header_size, 8);
  write_all(text.data(), text.size());
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsWriter::append(const void* data, uint64_t size) {
  if (written_ + size > data_size_) throw Error(path_ + ": more tensor data than the header describes");
  write_all(data, size);
  written_ += size;
}

void SafetensorsWriter::write_all(const void* data, uint64_t size) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, bytes, size);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error("cannot write " + path_ + ": " + std::strerror(errno));
    bytes += n;
    size -= uint64_t(n);
  }
}

void SafetensorsWriter::finish() {
  if (written_ != data_size_)
    throw Error(path_ + ": " + std::to_string(written_) + " bytes of tensor data written, the header describes " +
                std::to_string(data_size_));
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw Error("cannot write " + path_ + ": " + std::strerror(errno));
}

std::vector<std::vector<TensorEntry>> split_into_shards(const std::vector<TensorEntry>& tensors,
                                                        uint64_t max_shard_bytes) {
  std::vector<std::vector<TensorEntry>> shards(1);
  uint64_t current = 0;
  for (const TensorEntry& t : tensors) {
    const uint64_t size = uint64_t(t.nbytes());
    if (!shards.back().empty() && current + size > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(t);
    current += size;
  }
  return shards;
}

std::string shard_file_name(size_t index, size_t count) {
  if (count == 1) return "model.safetensors";
  char name[64];
  std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

std::string shard_index_json(const std::vector<std::vector<TensorEntry>>& shards) {
  json weight_map = json::object();
  uint64_t total_size = 0;
  for (size_t i = 0; i < shards.size(); i++)
    for (const TensorEntry& t : shards[i]) {
      weight_map[t.name] = shard_file_name(i, shards.size());
      total_size += uint64_t(t.nbytes());
    }
  return json{{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}}.dump(2) + "\n";
}

uint64_t parse_byte_size(const std::string& text) {
  static const struct { const char* suffix; double scale; } kUnits[] = {
      {"KiB", 0x1p10}, {"MiB", 0x1p20}, {"GiB", 0x1p30}, {"TiB", 0x1p40},
      {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1}};
  const Error bad("bad size \"" + text + "\" (expected bytes, or a number with KB, MB, GB, KiB, MiB or GiB)");
  std::string number = text;
  double scale = 1;
  for (const auto& unit : kUnits)
    if (number.ends_with(unit.suffix)) {
      number.resize(number.size() - std::strlen(unit.suffix));
      scale = unit.scale;
      break;
    }
  if (number.empty() || number.find_first_not_of("0123456789.") != std::string::npos) throw bad;
  double value;
  try {
    value = std::stod(number) * scale;
  } catch (const std::exception&) {
    throw bad;
  }
  if (!(value >= 1 && value < 0x1p63)) throw bad;
  return uint64_t(value);
}

}  // namespace afm
