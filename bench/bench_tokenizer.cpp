// Tokenizer benchmark: load time of a tokenizer.json and single-threaded encode/decode speed on a
// corpus, encoded paragraph by paragraph (split on blank lines). Then the same encode by HF
// `tokenizers` (tests/oracles/hf_tokenize.py bench, one thread, cold cache) for comparison, when
// the .venv that scripts/install-deps.sh makes is there.
//
//   bench_tokenizer [tokenizer_dir] [corpus.txt]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "../tests/support/subprocess.h"
#include "error.h"
#include "tokenizer.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct EncodePass {
  size_t tokens = 0;
  double seconds = 0;
};

EncodePass encode_all(const afm::Tokenizer& tok, const std::vector<std::string>& paragraphs) {
  EncodePass pass;
  auto start = std::chrono::steady_clock::now();
  for (const std::string& p : paragraphs) pass.tokens += tok.encode(p, false).size();
  pass.seconds = seconds_since(start);
  return pass;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = argc > 1 ? argv[1] : AFM_SOURCE_DIR "/tests/fixtures/tokenizer-llama3";
  std::string corpus_path = argc > 2 ? argv[2] : AFM_SOURCE_DIR "/tests/fixtures/corpus/austen.txt";
  try {
    std::ifstream file(corpus_path, std::ios::binary);
    if (!file) throw afm::Error("cannot open corpus '" + corpus_path + "'");
    std::stringstream buffer;
    buffer << file.rdbuf();
    const std::string corpus = buffer.str();
    std::vector<std::string> paragraphs;
    for (size_t start = 0; start < corpus.size();) {
      size_t end = std::min(corpus.find("\n\n", start), corpus.size());
      paragraphs.push_back(corpus.substr(start, end - start));
      start = end + 2;
    }

    // Loading: the best of five, since the first one also pays for paging the file in.
    std::vector<double> loads;
    for (int i = 0; i < 5; i++) {
      auto start = std::chrono::steady_clock::now();
      afm::Tokenizer::load(dir + "/tokenizer.json");
      loads.push_back(seconds_since(start));
    }
    std::sort(loads.begin(), loads.end());
    std::printf("load %s/tokenizer.json: best %.1f ms, median %.1f ms\n", dir.c_str(), loads[0] * 1e3,
                loads[2] * 1e3);

    afm::Tokenizer tok = afm::Tokenizer::load(dir + "/tokenizer.json");
    EncodePass cold = encode_all(tok, paragraphs);  // the word cache starts empty, as in HF's run
    EncodePass warm = encode_all(tok, paragraphs);
    double mb = corpus.size() / 1e6;
    std::printf("corpus %s: %.2f MB, %zu paragraphs\n", corpus_path.c_str(), mb, paragraphs.size());
    std::printf("encode cold cache: %zu tokens in %.3f s = %.2f M tokens/s, %.1f MB/s\n", cold.tokens,
                cold.seconds, cold.tokens / cold.seconds / 1e6, mb / cold.seconds);
    std::printf("encode warm cache: %zu tokens in %.3f s = %.2f M tokens/s, %.1f MB/s\n", warm.tokens,
                warm.seconds, warm.tokens / warm.seconds / 1e6, mb / warm.seconds);

    std::vector<int32_t> ids = tok.encode(corpus, false);
    auto start = std::chrono::steady_clock::now();
    std::string text = tok.decode(ids, false);
    double decode_seconds = seconds_since(start);
    std::printf("decode: %zu tokens in %.3f s = %.1f M tokens/s (round trip %s)\n", ids.size(),
                decode_seconds, ids.size() / decode_seconds / 1e6, text == corpus ? "exact" : "DIFFERS");

    if (text != corpus) return 1;

    afm::test::Result hf = afm::test::run_oracle("hf_tokenize.py bench '" + dir + "/tokenizer.json' '" +
                                                 corpus_path + "' 2>&1");
    EncodePass theirs;
    char version[32];
    if (hf.status != 0 ||
        std::sscanf(hf.out.c_str(), "tokens=%zu seconds=%lf tokenizers=%31s", &theirs.tokens, &theirs.seconds,
                    version) != 3) {
      std::printf("HF tokenizers: not measured (tests/oracles/hf_tokenize.py bench failed):\n%s", hf.out.c_str());
      return 0;
    }
    std::printf("HF tokenizers %s, one thread, cold cache: %zu tokens in %.3f s = %.2f M tokens/s\n", version,
                theirs.tokens, theirs.seconds, theirs.tokens / theirs.seconds / 1e6);
    if (theirs.tokens != cold.tokens) {
      std::printf("token counts differ: afm %zu, HF %zu\n", cold.tokens, theirs.tokens);
      return 1;
    }
    std::printf("afm encodes %.1fx faster than HF tokenizers (cold cache both)\n", theirs.seconds / cold.seconds);
    return 0;
  } catch (const afm::Error& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", e.what());
    return 1;
  }
}
