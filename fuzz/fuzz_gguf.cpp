// A GGUF file: header, typed metadata, tensor infos and data ranges, then what afm derives from
// them without building weights: the HF config, the HF-named tensors (with q/k rows unpermuted),
// the tokenizer.json text and the chat template. The input is copied to a buffer of exactly its
// size, so a range the checks let past the end is an ASan report, not a read of mmap slack.
// fuzz.sh flags: -max_len=65536
#include <cstdint>
#include <cstring>
#include <memory>

#include "error.h"
#include "gguf.h"
#include "gguf_model.h"

namespace {

// Runs one step, so that an afm::Error in one (say, no tokenizer) does not hide the others.
template <typename F>
void attempt(F&& step) {
  try {
    step();
  } catch (const afm::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto buffer = std::shared_ptr<uint8_t[]>(new uint8_t[size]);
  if (size) std::memcpy(buffer.get(), data, size);
  attempt([&] {
    const afm::GGUFFile file = afm::GGUFFile::parse({buffer.get(), size, buffer}, "fuzz.gguf");
    for (const afm::TensorView& t : file.tensors())
      if (t.numel() <= (1 << 16)) attempt([&] { t.to_f32(); });  // every byte of the accepted range
    attempt([&] { afm::gguf_checkpoint(file, afm::gguf_model_config(file)); });
    attempt([&] { afm::gguf_tokenizer_json(file); });
    attempt([&] { afm::gguf_chat_template(file); });
  });
  return 0;
}
