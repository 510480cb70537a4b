#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "error.h"
#include "numeric.h"

namespace afm {

namespace fs = std::filesystem;
using json = nlohmann::json;

static DType parse_dtype(const std::string& name, const std::string& where) {
  for (DType d : {DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::BFP8, DType::BFP4})
    if (name == dtype_name(d)) return d;
  throw Error(where + ": unsupported dtype " + name + " (supported: F32, F16, BF16, I64, I32, and afm convert's AFM_BFP8, AFM_BFP4)");
}

// A JSON array of integers. nlohmann's get<std::vector<int64_t>> would also take floats and
// convert them, which is undefined behaviour beyond the integer's range (a shape of [1e21]).
template <typename T>
static std::vector<T> integer_array(const json& value, const std::string& where, const char* key) {
  if (!value.is_array()) throw Error(where + ": " + key + " is not an array");
  std::vector<T> out;
  for (const json& element : value) {
    if (!element.is_number_integer())
      throw Error(where + ": " + key + " holds " + (element.is_primitive() ? element.dump() : element.type_name()) +
                  ", not an integer");
    out.push_back(element.get<T>());
  }
  return out;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::describe() const {
  std::string s = name + " [";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "] " + dtype_name(dtype);
}

std::vector<float> TensorView::to_f32() const {
  if (!is_floating(dtype)) throw Error(describe() + ": expected a floating-point tensor");
  std::vector<float> out(numel());
  const int64_t cols = shape.empty() ? 1 : shape.back(), row_bytes = dtype_row_bytes(dtype, cols);
  for (int64_t r = 0; cols && r < numel() / cols; r++) floats_to_f32(dtype, data + r * row_bytes, cols, &out[r * cols]);
  return out;
}

std::vector<int64_t> TensorView::to_i64() const {
  std::vector<int64_t> out(numel());
  for (int64_t i = 0; i < numel(); i++) {
    if (dtype == DType::I64) std::memcpy(&out[i], data + 8 * i, 8);
    else if (dtype == DType::I32) { int32_t v; std::memcpy(&v, data + 4 * i, 4); out[i] = v; }
    else throw Error(describe() + ": expected an integer tensor");
  }
  return out;
}

namespace {

// The file stays mapped for as long as any TensorView points into it.
struct Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() { if (base) munmap(base, size); }
};

}  // namespace

MappedFile map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("cannot open " + path + ": " + std::strerror(errno));
  struct stat st {};
  fstat(fd, &st);
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("cannot read " + path + ": not a regular file");
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->size = size_t(st.st_size);
  if (mapping->size > 0) {
    void* base = mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) {
      ::close(fd);
      throw Error("cannot map " + path + ": " + std::strerror(errno));
    }
    mapping->base = base;
  }
  ::close(fd);
  return {static_cast<const uint8_t*>(mapping->base), uint64_t(mapping->size), mapping};
}

SafetensorsFile SafetensorsFile::open(const std::string& path) { return parse(map_file(path), path); }

SafetensorsFile SafetensorsFile::parse(const MappedFile& mapped, const std::string& path) {
  const uint8_t* bytes = mapped.data;
  const uint64_t file_size = mapped.size;
  if (file_size < 8) throw Error(path + ": truncated safetensors file (" + std::to_string(file_size) + " bytes, no header)");
  uint64_t header_size;
  std::memcpy(&header_size, bytes, 8);
  if (header_size > file_size - 8)
    throw Error(path + ": truncated safetensors file (header says " + std::to_string(header_size) +
                " bytes, file has " + std::to_string(file_size) + ")");

  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_size);
  } catch (const json::exception& e) {
    throw Error(path + ": malformed safetensors header: " + e.what());
  }
  if (!header.is_object()) throw Error(path + ": malformed safetensors header: not a JSON object");

  SafetensorsFile file;
  file.path_ = path;
  const uint64_t data_start = 8 + header_size;
  const uint64_t data_size = file_size - data_start;
  struct Range {
    uint64_t begin, end;
    std::string name;
    bool operator<(const Range& other) const { return begin < other.begin; }
  };
  std::vector<Range> ranges;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor " + name;
    try {
      TensorView view;
      view.name = name;
      view.dtype = parse_dtype(info.at("dtype").get<std::string>(), where);
      view.shape = integer_array<int64_t>(info.at("shape"), where, "shape");
      const auto offsets = integer_array<uint64_t>(info.at("data_offsets"), where, "data_offsets");
      if (offsets.size() != 2 || offsets[0] > offsets[1]) throw Error(where + ": bad data_offsets");
      if (offsets[1] > data_size)
        throw Error(where + " ends at byte " + std::to_string(offsets[1]) + " but the file has only " +
                    std::to_string(data_size) + " data bytes: truncated file");
      // The rows times the row size must equal the byte range, without overflowing; so must the
      // element count, which a zero dimension does not bound ([2^48, 2^48, 0] holds 0 bytes).
      int64_t elements = 1;
      for (int64_t d : view.shape)
        if (d < 0 || d > (int64_t(1) << 48) || __builtin_mul_overflow(elements, d, &elements))
          throw Error(where + ": impossible shape " + view.describe());
      int64_t expected_bytes = dtype_row_bytes(view.dtype, view.shape.empty() ? 1 : view.shape.back());
      for (size_t i = 0; i + 1 < view.shape.size(); i++)
        if (__builtin_mul_overflow(expected_bytes, view.shape[i], &expected_bytes))
          throw Error(where + ": impossible shape " + view.describe());
      view.nbytes = int64_t(offsets[1] - offsets[0]);
      if (view.nbytes != expected_bytes)
        throw Error(where + ": " + std::to_string(view.nbytes) + " bytes do not hold shape " + view.describe());
      view.data = bytes + data_start + offsets[0];
      view.owner = mapped.owner;
      view.file_mapped = true;
      if (view.nbytes) ranges.push_back({offsets[0], offsets[1], name});
      file.tensors_.emplace(name, std::move(view));
    } catch (const json::exception& e) {
      throw Error(where + ": malformed entry: " + e.what());
    }
  }
  // The format forbids it (each byte belongs to one tensor), and two views of one range would
  // alias tensors the model treats as independent.
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); i++)
    if (ranges[i].begin < ranges[i - 1].end)
      throw Error(path + ": tensors " + ranges[i - 1].name + " and " + ranges[i].name + " overlap in the data");
  return file;
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(path_ + ": no tensor named " + name);
  return it->second;
}

Checkpoint Checkpoint::open(const std::string& dir) {
  if (!fs::is_directory(dir)) throw Error("model folder not found: " + dir);
  Checkpoint checkpoint;
  checkpoint.dir_ = dir;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";

  std::vector<std::string> shards;
  std::map<std::string, std::string> expected_shard;  // tensor name -> shard file, from the index
  if (fs::exists(index)) {
    json index_json;
    try {
      std::ifstream in(index);
      index_json = json::parse(in);
      for (const auto& [name, shard] : index_json.at("weight_map").items())
        expected_shard[name] = shard.get<std::string>();
    } catch (const json::exception& e) {
      throw Error(index.string() + ": malformed index: " + e.what());
    }
    std::set<std::string> unique;
    for (const auto& [name, shard] : expected_shard) unique.insert(shard);
    for (const auto& shard : unique) {
      // HF writes shards beside the index; a path elsewhere would read files outside the model.
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos)
        throw Error(index.string() + " lists shard \"" + shard + "\", which is not a file name in " + dir);
      if (!fs::exists(fs::path(dir) / shard))
        throw Error(index.string() + " lists shard " + shard + ", which is missing from " + dir);
      shards.push_back(shard);
    }
  } else if (fs::exists(single)) {
    shards.push_back("model.safetensors");
  } else {
    throw Error(dir + " has neither model.safetensors nor model.safetensors.index.json");
  }

  for (const auto& shard : shards) {
    SafetensorsFile file = SafetensorsFile::open((fs::path(dir) / shard).string());
    for (const auto& [name, view] : file.tensors()) {
      if (!expected_shard.empty() && expected_shard.count(name) && expected_shard[name] != shard)
        throw Error(file.path() + " holds " + name + ", which the index places in " + expected_shard[name]);
      if (!checkpoint.tensors_.emplace(name, view).second)
        throw Error(dir + ": tensor " + name + " appears in more than one shard");
    }
  }
  for (const auto& [name, shard] : expected_shard)
    if (!checkpoint.contains(name)) throw Error("the index places " + name + " in " + shard + ", but that shard has no such tensor");
  return checkpoint;
}

Checkpoint Checkpoint::random(uint64_t seed) {
  Checkpoint checkpoint;
  checkpoint.dir_ = "(random weights)";
  checkpoint.random_seed_ = seed;
  return checkpoint;
}

Checkpoint Checkpoint::from_tensors(std::string source, std::map<std::string, TensorView> tensors) {
  Checkpoint checkpoint;
  checkpoint.dir_ = std::move(source);
  checkpoint.tensors_ = std::move(tensors);
  return checkpoint;
}

const TensorView& Checkpoint::get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(dir_ + ": missing tensor " + name);
  return it->second;
}

}  // namespace afm
