// The tokenizer on untrusted input. The first byte picks what the rest is:
//   0      a tokenizer.json, loaded (a model folder can hold any), then used if it loads
//   1, 2   text for Llama 3's / the embedded model's tokenizer: encode (invalid UTF-8 must be an
//          afm::Error), then decode back, which must give the text again
//   3, 4   token ids (little-endian int32, any value) for either: decode, stream and look up
// Every failure must be an afm::Error.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "error.h"
#include "tokenizer.h"

namespace {

const afm::Tokenizer* llama3;
const afm::Tokenizer* austen;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_tokenizer: %s\n", what);
    std::abort();
  }
}

void use(const afm::Tokenizer& t, std::string_view text) {
  const std::vector<int32_t> ids = t.encode(text, /*add_special_tokens=*/true);
  t.decode(ids, /*skip_special_tokens=*/true);
}

void round_trip(const afm::Tokenizer& t, std::string_view text) {
  try {
    const std::vector<int32_t> ids = t.encode(text, /*add_special_tokens=*/false);
    // Byte-level BPE with no normalizer loses nothing, special tokens included.
    check(t.decode(ids, /*skip_special_tokens=*/false) == text, "decode(encode(text)) != text");
    t.encode(text, /*add_special_tokens=*/true);
  } catch (const afm::Error&) {  // invalid UTF-8
  }
}

void decode_ids(const afm::Tokenizer& t, const uint8_t* data, size_t size, bool skip_special) {
  std::vector<int32_t> ids(size / 4);
  if (!ids.empty()) std::memcpy(ids.data(), data, ids.size() * 4);
  const std::string text = t.decode(ids, skip_special);
  afm::StreamDecoder stream(t, skip_special);
  std::string streamed;
  for (int32_t id : ids) {
    streamed += stream.push(id);
    t.is_special(id);
    try {
      t.token_text(id);
    } catch (const afm::Error&) {  // no token has that id
    }
  }
  streamed += stream.flush();
  check(streamed == text, "StreamDecoder's output != decode()");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static const afm::Tokenizer l = afm::Tokenizer::load(AFM_DEFAULT_MODEL_DIR "/../../tests/fixtures/tokenizer-llama3/tokenizer.json");
  static const afm::Tokenizer a = afm::Tokenizer::load(AFM_DEFAULT_MODEL_DIR "/tokenizer.json");
  llama3 = &l;
  austen = &a;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0] % 5;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (mode) {
    case 0:
      try {
        use(afm::Tokenizer::from_json(rest, "fuzz.json"), "Hello world! <|endoftext|> 123 \xC3\xA9t\xC3\xA9");
      } catch (const afm::Error&) {
      }
      break;
    case 1: round_trip(*llama3, rest); break;
    case 2: round_trip(*austen, rest); break;
    case 3:
    case 4: decode_ids(mode == 3 ? *llama3 : *austen, data + 1, size - 1, (data[0] / 5) % 2); break;
  }
  return 0;
}
