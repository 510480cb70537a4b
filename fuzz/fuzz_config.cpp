// config.json into a ModelConfig: every size, head count, RoPE parameter and token id is either
// accepted within the limits the engine can build, or refused with an afm::Error. An accepted
// config must also give finite RoPE frequencies (or a clear error): NaN would pass silently.
// fuzz.sh flags: -max_len=16384
#include <cmath>
#include <cstdint>
#include <string>

#include "config.h"
#include "error.h"
#include "rope.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  afm::ModelConfig c;
  try {
    c = afm::parse_config(std::string(reinterpret_cast<const char*>(data), size), "fuzz/config.json");
  } catch (const afm::Error&) {
    return 0;
  }
  if (c.num_kv_heads <= 0 || c.num_heads % c.num_kv_heads != 0 || c.head_dim <= 0 || c.head_dim % 2 != 0)
    __builtin_trap();
  try {
    const afm::RopeFrequencies rope = afm::rope_frequencies(c.rope, c.head_dim);
    for (float f : rope.inv_freq)
      if (!std::isfinite(f)) __builtin_trap();
    if (!std::isfinite(rope.attention_scaling)) __builtin_trap();
  } catch (const afm::Error&) {
  }
  return 0;
}
