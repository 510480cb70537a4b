// Test support, independent of the code under test: files, scratch folders, and a small
// safetensors reader/writer (8-byte little-endian header length, JSON header, then the data
// area), so tests can build real checkpoints on disk and edit or damage them.
#pragma once
#include "numeric.h"
#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace afm_test {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Files

inline std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("test helper: cannot read " + path.string());
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("test helper: cannot write " + path.string());
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

inline json read_json(const fs::path& path) { return json::parse(read_bytes(path)); }
inline void write_json(const fs::path& path, const json& j) { write_bytes(path, j.dump(2)); }

// A fresh folder under the system temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "afm_test_") {
    std::string pattern = (fs::temp_directory_path() / (prefix + "XXXXXX")).string();
    if (!mkdtemp(pattern.data())) throw std::runtime_error("test helper: mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// ---------------------------------------------------------------------------------------------
// safetensors

struct RawTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
using TensorMap = std::map<std::string, RawTensor>;

inline std::string u64_le(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; i++) out[i] = char((v >> (8 * i)) & 0xff);
  return out;
}

inline std::string encode_safetensors(const std::string& header, const std::string& data) {
  return u64_le(header.size()) + header + data;
}

inline TensorMap read_safetensors(const fs::path& path) {
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 0; i < 8; i++) n |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  const json header = json::parse(bytes.substr(8, n));
  TensorMap tensors;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
    tensors[name] = RawTensor{info.at("dtype").get<std::string>(), info.at("shape").get<std::vector<int64_t>>(),
                              bytes.substr(8 + n + offsets[0], offsets[1] - offsets[0])};
  }
  return tensors;
}

// The header of a well-formed file holding `tensors`, in name order, packed.
inline json header_for(const TensorMap& tensors, std::string* data) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  data->clear();
  for (const auto& [name, t] : tensors) {
    const uint64_t begin = data->size();
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", json::array({begin, begin + t.bytes.size()})}};
    *data += t.bytes;
  }
  return header;
}

inline void write_safetensors(const fs::path& path, const TensorMap& tensors) {
  std::string data;
  const json header = header_for(tensors, &data);
  write_bytes(path, encode_safetensors(header.dump(), data));
}

// Read-modify-write one safetensors file's tensors.
inline void edit_tensors(const fs::path& path, const std::function<void(TensorMap&)>& edit) {
  TensorMap tensors = read_safetensors(path);
  edit(tensors);
  write_safetensors(path, tensors);
}

// Read-modify-write one safetensors file's header, keeping its data area as it is.
inline void edit_header(const fs::path& path, const std::function<void(json&)>& edit) {
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 0; i < 8; i++) n |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  json header = json::parse(bytes.substr(8, n));
  edit(header);
  write_bytes(path, encode_safetensors(header.dump(), bytes.substr(8 + n)));
}

// ---------------------------------------------------------------------------------------------
// Number formats

// bf16 conversions are afm's own (numeric.h): storage format helpers, not code under test here.
using afm::bf16_to_f32;
using afm::f32_to_bf16;

// float -> IEEE binary16, round to nearest even, by the CPU's own F16C conversion (every x86-64
// machine these tests run on has it; clang 14 has no _Float16 on x86).
__attribute__((target("f16c"))) inline uint16_t f32_to_f16_bits(float f) {
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}

// A tensor of `values` (row-major, shape's product long) stored as F32 or BF16. For BF16 the
// values are rounded in place, so the caller keeps exactly what the file holds.
inline RawTensor make_tensor(std::vector<float>& values, std::vector<int64_t> shape, const std::string& dtype) {
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  if (count != int64_t(values.size())) throw std::runtime_error("test helper: shape does not match the values");
  RawTensor t{dtype, std::move(shape), {}};
  if (dtype == "F32") {
    t.bytes.resize(values.size() * 4);
    std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  } else if (dtype == "BF16") {
    t.bytes.resize(values.size() * 2);
    for (size_t i = 0; i < values.size(); i++) {
      const uint16_t b = f32_to_bf16(values[i]);
      values[i] = bf16_to_f32(b);
      std::memcpy(t.bytes.data() + 2 * i, &b, 2);
    }
  } else {
    throw std::runtime_error("test helper: make_tensor writes F32 or BF16, not " + dtype);
  }
  return t;
}

}  // namespace afm_test
