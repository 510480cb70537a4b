// model.safetensors.index.json: the weight map, the shards it names, and its agreement with what
// the shards hold. Each input is the index of a folder (one per process, removed at exit) that
// also holds two small valid shards, so that the fuzzer can reach the cross-checks by naming them.
// fuzz.sh flags: -max_len=8192
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include "error.h"
#include "safetensors.h"

namespace {

namespace fs = std::filesystem;

// A safetensors file of F32 tensors of one value each.
void write_shard(const fs::path& path, const std::string& first, const std::string& second) {
  const std::string header = "{\"" + first + "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"" + second +
                             "\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}";
  const uint64_t length = header.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&length), 8);
  out << header << std::string(8, '\0');
}

struct Folder {
  fs::path dir = fs::temp_directory_path() / ("afm-fuzz-index-" + std::to_string(getpid()));
  Folder() {
    fs::create_directories(dir);
    write_shard(dir / "model-00001-of-00002.safetensors", "a", "b");
    write_shard(dir / "model-00002-of-00002.safetensors", "c", "d");
  }
  ~Folder() { fs::remove_all(dir); }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Folder folder;
  std::ofstream(folder.dir / "model.safetensors.index.json", std::ios::binary)
      .write(reinterpret_cast<const char*>(data), std::streamsize(size));
  try {
    const afm::Checkpoint checkpoint = afm::Checkpoint::open(folder.dir.string());
    for (const auto& [name, view] : checkpoint.tensors())
      if (afm::is_floating(view.dtype)) view.to_f32();
  } catch (const afm::Error&) {
  }
  return 0;
}
