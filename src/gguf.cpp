#include "gguf.h"

#include <algorithm>
#include <cstring>

#include "error.h"

namespace afm {

namespace {

// ggml's type ids (ggml.h) for the tensor types afm reads.
std::optional<DType> ggml_dtype(uint32_t id) {
  switch (id) {
    case 0: return DType::F32;
    case 1: return DType::F16;
    case 2: return DType::Q4_0;
    case 3: return DType::Q4_1;
    case 6: return DType::Q5_0;
    case 7: return DType::Q5_1;
    case 8: return DType::Q8_0;
    case 10: return DType::Q2_K;
    case 11: return DType::Q3_K;
    case 12: return DType::Q4_K;
    case 13: return DType::Q5_K;
    case 14: return DType::Q6_K;
    case 30: return DType::BF16;
    default: return std::nullopt;
  }
}

constexpr int kMaxDims = 4;         // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 4;   // arrays of arrays exist (merges as pairs); deeper is hostile
// Array elements in all the metadata: a parsed value takes ~40 bytes however small its encoding,
// so the file-size bound alone would let a 1 GB file of u8s take 40 GB. Real files hold about a
// million (vocabularies of 256k tokens with scores and types, and their merges).
constexpr uint64_t kMaxMetadataValues = uint64_t(1) << 23;

// Reads little-endian values from the mapped header, refusing to step past the end of the file.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, const std::string& path) : data_(data), size_(size), path_(path) {}

  uint64_t offset() const { return offset_; }
  uint64_t remaining() const { return size_ - offset_; }

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, data_ + offset_, sizeof(T));
    offset_ += sizeof(T);
    return value;
  }

  std::string_view string(const char* what) {
    const uint64_t length = read<uint64_t>(what);
    if (length > remaining())
      fail(std::string(what) + " is " + std::to_string(length) + " bytes long, past the end of the file");
    std::string_view s(reinterpret_cast<const char*>(data_ + offset_), length);
    offset_ += length;
    return s;
  }

  // A count of items that each take at least `min_bytes`: more than the rest of the file can hold
  // is refused before anything is allocated for them.
  uint64_t count(const char* what, uint64_t min_bytes) {
    const uint64_t n = read<uint64_t>(what);
    if (n > remaining() / min_bytes)
      fail("claims " + std::to_string(n) + " " + what + ", more than the file's " + std::to_string(size_) +
           " bytes can hold");
    return n;
  }

  // Counts n more metadata array elements against kMaxMetadataValues, before they are allocated.
  void take_values(uint64_t n) {
    if (n > values_left_)
      fail("more than " + std::to_string(kMaxMetadataValues) + " metadata values in all (afm's limit)");
    values_left_ -= n;
  }

  [[noreturn]] void fail(const std::string& message) const {
    throw Error(path_ + ": malformed GGUF at byte " + std::to_string(offset_) + ": " + message);
  }

 private:
  void need(uint64_t n, const char* what) {
    if (n > remaining()) fail(std::string("truncated file: it ends inside ") + what);
  }
  const uint8_t* data_;
  uint64_t size_, offset_ = 0;
  uint64_t values_left_ = kMaxMetadataValues;
  const std::string& path_;
};

// Smallest encoding of one value of each type, for the count check of arrays.
uint64_t min_value_bytes(GGUFValue::Type type) {
  using T = GGUFValue::Type;
  switch (type) {
    case T::U8: case T::I8: case T::Bool: return 1;
    case T::U16: case T::I16: return 2;
    case T::U32: case T::I32: case T::F32: return 4;
    case T::U64: case T::I64: case T::F64: case T::String: return 8;
    case T::Array: return 12;
  }
  return 1;
}

GGUFValue read_value(Cursor& in, uint32_t type_id, int depth) {
  using T = GGUFValue::Type;
  if (type_id > uint32_t(T::F64)) in.fail("unknown metadata value type " + std::to_string(type_id));
  GGUFValue v;
  v.type = T(type_id);
  switch (v.type) {
    case T::U8: v.value = int64_t(in.read<uint8_t>("a u8 value")); break;
    case T::I8: v.value = int64_t(in.read<int8_t>("an i8 value")); break;
    case T::U16: v.value = int64_t(in.read<uint16_t>("a u16 value")); break;
    case T::I16: v.value = int64_t(in.read<int16_t>("an i16 value")); break;
    case T::U32: v.value = int64_t(in.read<uint32_t>("a u32 value")); break;
    case T::I32: v.value = int64_t(in.read<int32_t>("an i32 value")); break;
    case T::I64: v.value = in.read<int64_t>("an i64 value"); break;
    case T::U64: {
      const uint64_t u = in.read<uint64_t>("a u64 value");
      if (u > uint64_t(INT64_MAX)) in.fail("u64 value " + std::to_string(u) + " is out of range");
      v.value = int64_t(u);
      break;
    }
    case T::F32: v.value = double(in.read<float>("an f32 value")); break;
    case T::F64: v.value = in.read<double>("an f64 value"); break;
    case T::Bool: {
      const uint8_t b = in.read<uint8_t>("a bool value");
      if (b > 1) in.fail("bool value " + std::to_string(b) + " is neither 0 nor 1");
      v.value = b == 1;
      break;
    }
    case T::String: v.value = in.string("a metadata string"); break;
    case T::Array: {
      if (depth >= kMaxArrayDepth) in.fail("arrays nested more than " + std::to_string(kMaxArrayDepth) + " deep");
      const uint32_t element_type = in.read<uint32_t>("an array's element type");
      if (element_type > uint32_t(T::F64)) in.fail("unknown array element type " + std::to_string(element_type));
      const uint64_t n = in.count("array elements", min_value_bytes(T(element_type)));
      in.take_values(n);
      std::vector<GGUFValue> elements;
      elements.reserve(n);
      for (uint64_t i = 0; i < n; i++) elements.push_back(read_value(in, element_type, depth + 1));
      v.value = std::move(elements);
      break;
    }
  }
  return v;
}

}  // namespace

GGUFFile GGUFFile::open(const std::string& path) { return parse(map_file(path), path); }

GGUFFile GGUFFile::parse(const MappedFile& mapped, const std::string& path) {
  Cursor in(mapped.data, mapped.size, path);
  if (mapped.size < 4 || std::memcmp(mapped.data, "GGUF", 4) != 0)
    throw Error(path + ": not a GGUF file (it does not start with the magic bytes \"GGUF\")");
  in.read<uint32_t>("the magic");
  GGUFFile file;
  file.path_ = path;
  file.mapping_ = mapped.owner;
  file.version_ = in.read<uint32_t>("the version");
  if (file.version_ != 2 && file.version_ != 3) {
    // A byte-swapped small number is a big-endian file, which llama.cpp also writes.
    const bool big_endian = __builtin_bswap32(file.version_) == 2 || __builtin_bswap32(file.version_) == 3;
    throw Error(path + ": unsupported GGUF version " + std::to_string(file.version_) +
                (big_endian ? " (this is a big-endian GGUF file; afm reads little-endian ones)"
                            : " (afm reads versions 2 and 3)"));
  }
  // Each tensor info takes at least 8 (name length) + 4 (dims) + 4 (type) + 8 (offset) bytes,
  // each key/value at least 8 (key length) + 4 (type) + 1.
  const uint64_t tensor_count = in.count("tensors", 24);
  const uint64_t kv_count = in.count("metadata entries", 13);

  for (uint64_t i = 0; i < kv_count; i++) {
    const std::string key(in.string("a metadata key"));
    const uint32_t type = in.read<uint32_t>("a metadata value type");
    GGUFValue value = read_value(in, type, 0);
    if (!file.metadata_.emplace(key, std::move(value)).second) in.fail("metadata key " + key + " appears twice");
  }

  uint64_t alignment = 32;  // GGUF_DEFAULT_ALIGNMENT
  if (auto a = file.integer("general.alignment")) {
    if (*a <= 0 || (*a & (*a - 1)) != 0) in.fail("general.alignment " + std::to_string(*a) + " is not a power of two");
    alignment = uint64_t(*a);
  }

  struct Info {
    TensorView view;
    uint64_t offset;
  };
  std::vector<Info> infos;
  infos.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; i++) {
    Info info;
    TensorView& view = info.view;
    view.name = std::string(in.string("a tensor name"));
    const uint32_t n_dims = in.read<uint32_t>("a tensor's dimension count");
    if (n_dims == 0 || n_dims > kMaxDims)
      in.fail("tensor " + view.name + " has " + std::to_string(n_dims) + " dimensions (1 to 4 are valid)");
    std::vector<int64_t> dims(n_dims);
    for (uint32_t d = 0; d < n_dims; d++) {
      const uint64_t n = in.read<uint64_t>("a tensor dimension");
      if (n == 0 || n > uint64_t(INT64_MAX)) in.fail("tensor " + view.name + " has a dimension of " + std::to_string(n));
      dims[d] = int64_t(n);
    }
    const uint32_t type_id = in.read<uint32_t>("a tensor type");
    const std::optional<DType> dtype = ggml_dtype(type_id);
    if (!dtype)
      in.fail("tensor " + view.name + " has ggml type " + std::to_string(type_id) +
              ", which afm does not read (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, "
              "Q4_K, Q5_K, Q6_K)");
    view.dtype = *dtype;
    view.shape.assign(dims.rbegin(), dims.rend());
    const BlockLayout block = dtype_block(view.dtype);
    if (dims[0] % block.values != 0)
      in.fail("tensor " + view.name + ": its rows of " + std::to_string(dims[0]) + " values are not whole " +
              dtype_name(view.dtype) + " blocks of " + std::to_string(block.values));
    int64_t bytes;
    bool overflow = __builtin_mul_overflow(dims[0] / block.values, block.bytes, &bytes);
    for (uint32_t d = 1; d < n_dims; d++) overflow = overflow || __builtin_mul_overflow(bytes, dims[d], &bytes);
    if (overflow) in.fail("tensor " + view.name + " has an impossible size");
    view.nbytes = bytes;
    info.offset = in.read<uint64_t>("a tensor offset");
    if (info.offset % alignment != 0)
      in.fail("tensor " + view.name + "'s offset " + std::to_string(info.offset) + " is not aligned to " +
              std::to_string(alignment));
    infos.push_back(std::move(info));
  }

  const uint64_t data_start = (in.offset() + alignment - 1) / alignment * alignment;
  const uint64_t data_size = mapped.size >= data_start ? mapped.size - data_start : 0;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (Info& info : infos) {
    TensorView& view = info.view;
    if (info.offset > data_size || uint64_t(view.nbytes) > data_size - info.offset)
      throw Error(path + ": tensor " + view.describe() + " ends past the end of the file (" +
                  std::to_string(data_start + info.offset + view.nbytes) + " > " + std::to_string(mapped.size) +
                  " bytes): truncated file");
    view.data = mapped.data + data_start + info.offset;
    view.owner = mapped.owner;
    view.file_mapped = true;
    ranges.emplace_back(info.offset, info.offset + view.nbytes);
    if (file.find_tensor(view.name)) throw Error(path + ": tensor " + view.name + " appears twice");
    file.tensors_.push_back(std::move(view));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); i++)
    if (ranges[i].first < ranges[i - 1].second) throw Error(path + ": two tensors' data overlap");
  return file;
}

const TensorView* GGUFFile::find_tensor(std::string_view name) const {
  for (const TensorView& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

// The value at `key` as T: nullptr when absent, afm::Error when it holds another type.
template <typename T>
const T* GGUFFile::lookup(std::string_view key, const char* expected) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) return nullptr;
  if (const T* v = std::get_if<T>(&it->second.value)) return v;
  throw Error(path_ + ": metadata " + std::string(key) + " should be " + expected);
}

template <typename T>
std::vector<T> GGUFFile::array_of(std::string_view key, const char* expected) const {
  std::vector<T> out;
  const auto* array = lookup<std::vector<GGUFValue>>(key, expected);
  if (!array) return out;
  out.reserve(array->size());
  for (const GGUFValue& v : *array) {
    const T* element = std::get_if<T>(&v.value);
    if (!element) throw Error(path_ + ": metadata " + std::string(key) + " should be " + expected);
    out.push_back(*element);
  }
  return out;
}

template <typename T>
static std::optional<T> optional_of(const T* value) {
  return value ? std::optional<T>(*value) : std::nullopt;
}

std::optional<int64_t> GGUFFile::integer(std::string_view key) const {
  return optional_of(lookup<int64_t>(key, "an integer"));
}

std::optional<double> GGUFFile::number(std::string_view key) const {
  auto it = metadata_.find(key);
  if (it != metadata_.end() && std::holds_alternative<int64_t>(it->second.value))
    return double(std::get<int64_t>(it->second.value));
  return optional_of(lookup<double>(key, "a number"));
}

std::optional<bool> GGUFFile::boolean(std::string_view key) const { return optional_of(lookup<bool>(key, "a bool")); }

std::optional<std::string_view> GGUFFile::string(std::string_view key) const {
  return optional_of(lookup<std::string_view>(key, "a string"));
}

std::vector<std::string_view> GGUFFile::strings(std::string_view key) const {
  return array_of<std::string_view>(key, "an array of strings");
}

std::vector<int64_t> GGUFFile::integers(std::string_view key) const {
  return array_of<int64_t>(key, "an array of integers");
}

}  // namespace afm
