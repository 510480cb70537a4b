// GGUF, llama.cpp's single-file model format (versions 2 and 3): a header, typed metadata
// key/values, tensor infos, then aligned tensor data. The file is memory-mapped and every count,
// length and offset is checked against its size before anything is allocated or read.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "safetensors.h"

namespace afm {

// One metadata value. Integers of every width widen to int64 (uint64 beyond its range is
// refused), floats to double; strings point into the mapping.
struct GGUFValue {
  enum class Type : uint32_t { U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64 };
  Type type = Type::U8;
  std::variant<int64_t, double, bool, std::string_view, std::vector<GGUFValue>> value;
};

class GGUFFile {
 public:
  static GGUFFile open(const std::string& path);
  // The same checks on bytes already in memory; `path` only names them in errors.
  static GGUFFile parse(const MappedFile& mapped, const std::string& path);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  const std::map<std::string, GGUFValue, std::less<>>& metadata() const { return metadata_; }
  bool has(std::string_view key) const { return metadata_.count(key) != 0; }

  // Typed lookups: nullopt when the key is absent, afm::Error naming the key when its type is wrong.
  std::optional<int64_t> integer(std::string_view key) const;
  std::optional<double> number(std::string_view key) const;  // a float or an integer
  std::optional<bool> boolean(std::string_view key) const;
  std::optional<std::string_view> string(std::string_view key) const;
  std::vector<std::string_view> strings(std::string_view key) const;  // empty when absent
  std::vector<int64_t> integers(std::string_view key) const;

  // Tensors in file order, with GGUF's names and HF's shape order ([rows, cols]: GGUF lists the
  // innermost dimension first).
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find_tensor(std::string_view name) const;

 private:
  template <typename T>
  const T* lookup(std::string_view key, const char* expected) const;
  template <typename T>
  std::vector<T> array_of(std::string_view key, const char* expected) const;
  std::string path_;
  uint32_t version_ = 0;
  std::map<std::string, GGUFValue, std::less<>> metadata_;
  std::vector<TensorView> tensors_;
  std::shared_ptr<const void> mapping_;
};

}  // namespace afm
