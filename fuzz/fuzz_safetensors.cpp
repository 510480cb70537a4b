// A safetensors file: the header length, the JSON header, and each tensor's dtype, shape and
// byte range against the data that follows. The input is copied to a buffer of exactly its
// size, so a range the checks let past the end is an ASan report, not a read of mmap slack.
// fuzz.sh flags: -max_len=65536
#include <cstdint>
#include <cstring>
#include <memory>

#include "error.h"
#include "safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto buffer = std::shared_ptr<uint8_t[]>(new uint8_t[size]);
  if (size) std::memcpy(buffer.get(), data, size);
  try {
    const afm::SafetensorsFile file = afm::SafetensorsFile::parse({buffer.get(), size, buffer}, "fuzz.safetensors");
    for (const auto& [name, view] : file.tensors()) {
      // Touch every byte the checks accepted, through the same conversions the loader uses.
      if (view.numel() > (1 << 16)) continue;  // keeps each run fast; the range is checked anyway
      if (afm::is_floating(view.dtype)) view.to_f32();
      else view.to_i64();
    }
  } catch (const afm::Error&) {
  }
  return 0;
}
