// afm init: a random-weight checkpoint of a config's shape, in HF's layout, so benchmarks and
// tests load real files of AFM-4.5B's size without its weights. It streams: generation and
// writing go a chunk at a time, so a 9 GB checkpoint is written in about 70 MB of memory.

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <vector>

#include "backends/cpu/thread_pool.h"
#include "cli/checkpoint_folder.h"
#include "cli/common.h"
#include "error.h"
#include "numeric.h"
#include "safetensors_writer.h"

namespace afm::cli {

namespace {

namespace fs = std::filesystem;

struct InitFlags {
  std::string config, out, dtype = "bf16";
  std::string shard_size = "5GB";  // transformers' default for save_pretrained
  uint64_t seed = 0;
  bool random = false, force = false;
};

// The architectures of afm's model registry (src/model.cpp), and whether their MLP is gated.
struct Family {
  const char* architecture;
  bool gated_mlp;
};
constexpr Family kFamilies[] = {{"ArceeForCausalLM", false}, {"LlamaForCausalLM", true}};

const Family& find_family(const ModelConfig& c, const std::string& source) {
  std::string known;
  for (const Family& f : kFamilies) {
    if (c.architecture == f.architecture) return f;
    known += std::string(known.empty() ? "" : ", ") + f.architecture;
  }
  throw Error(source + ": unknown architecture \"" + c.architecture + "\" (afm init writes " + known + ")");
}

// The tensors afm's decoder asks for (load_weights in src/models/decoder.cpp), with its names
// and shapes, in the order of transformers' state dict, so shards split where HF's do. A tied
// lm_head is not stored, as HF does not store it.
std::vector<TensorEntry> checkpoint_tensors(const ModelConfig& c, bool gated_mlp, DType dtype) {
  const int64_t hidden = c.hidden_size, ffn = c.intermediate_size;
  const int64_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
  std::vector<TensorEntry> t;
  auto add = [&](std::string name, std::vector<int64_t> shape) { t.push_back({std::move(name), dtype, shape}); };
  add("model.embed_tokens.weight", {c.vocab_size, hidden});
  for (int64_t i = 0; i < c.num_layers; i++) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "self_attn.q_proj.weight", {q_dim, hidden});
    add(p + "self_attn.k_proj.weight", {kv_dim, hidden});
    add(p + "self_attn.v_proj.weight", {kv_dim, hidden});
    add(p + "self_attn.o_proj.weight", {hidden, q_dim});
    if (gated_mlp) add(p + "mlp.gate_proj.weight", {ffn, hidden});
    add(p + "mlp.up_proj.weight", {ffn, hidden});
    add(p + "mlp.down_proj.weight", {hidden, ffn});
    add(p + "input_layernorm.weight", {hidden});
    add(p + "post_attention_layernorm.weight", {hidden});
  }
  add("model.norm.weight", {hidden});
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, hidden});
  return t;
}

// Value pair j of a tensor comes from mix64(key + j * kGolden) (src/numeric.h): the bytes depend
// on the seed and the tensor's name only, not on threads or chunking.
uint64_t tensor_key(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a: stable across compilers, unlike std::hash
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ull;
  return mix64(mix64(seed) ^ h);
}

constexpr int64_t kPiece = 4096;  // values generated at a time by one thread

// Values [first, first + n) of the tensor with `key` (first even, n <= kPiece; `out` has room
// for n rounded up to even): N(0, std^2) by Box-Muller, two values per 64 random bits.
// ln and sin/cos are short polynomials of plain + - * / so the loop vectorizes (AVX2 where the CPU
// has it: target_clones picks at run time; CMakeLists.txt compiles this file without errno
// checks on sqrt, which would stop vectorization). Their error, under 1e-6, is far below bf16's
// rounding, and without FMA contraction every clone computes the same bits.
__attribute__((target_clones("avx2", "default"))) void fill_normal(uint64_t key, int64_t first, int64_t n, float std,
                                                                   float* out) {
  uint64_t bits[kPiece / 2];
  const int64_t pairs = (n + 1) / 2;
  for (int64_t j = 0; j < pairs; j++) bits[j] = mix64(key + uint64_t(first / 2 + j + 1) * kGolden);
  for (int64_t j = 0; j < pairs; j++) {
    const uint64_t w = bits[j];
    // The radius from u1 = k / 2^24 in (0, 1]: u1 = m 2^e with m in [sqrt(1/2), sqrt(2)), and
    // ln m = 2 atanh((m - 1) / (m + 1)) by its series.
    const uint32_t f = std::bit_cast<uint32_t>(float(int32_t(w >> 40) + 1));
    const uint32_t above = (f & 0x7fffff) > 0x3504f3;  // mantissa past sqrt(2): halve it
    const float m = std::bit_cast<float>((f & 0x7fffff) | (0x3f800000u - (above << 23)));
    const float e = float(int32_t(f >> 23) - 127 - 24 + int32_t(above));
    const float t = (m - 1) / (m + 1), t2 = t * t;
    const float ln_u1 = e * 0.693147180559945f + 2 * t * (1 + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7))));
    const float r = std * std::sqrt(-2 * ln_u1);
    // The angle: uniform in [0, pi/2) by Taylor series, and the quadrant from the two low bits.
    const float x = float(int32_t((w >> 16) & 0xffffff)) * (1.57079632679489662f * 0x1p-24f), x2 = x * x;
    const float sin = x * (1 + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880)))));
    const float cos =
        1 + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 + x2 * (-1.0f / 3628800)))));
    const uint32_t signs = uint32_t(w);
    out[2 * j] = std::bit_cast<float>(std::bit_cast<uint32_t>(r * cos) ^ (signs << 31));
    out[2 * j + 1] = std::bit_cast<float>(std::bit_cast<uint32_t>(r * sin) ^ ((signs & 2) << 30));
  }
}

// n floats as `dtype`, rounding to nearest even as torch does.
void encode(DType dtype, const float* in, int64_t n, uint8_t* out) {
  if (dtype == DType::F32) {
    std::memcpy(out, in, size_t(n) * 4);
    return;
  }
  auto* half = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; i++) {
    if (dtype == DType::BF16) {
      half[i] = f32_to_bf16(in[i]);
    } else {
      half[i] = f32_to_f16(in[i]);
    }
  }
}

DType parse_dtype(const std::string& name) {
  if (name == "bf16") return DType::BF16;
  if (name == "f16") return DType::F16;
  if (name == "f32") return DType::F32;
  throw Error("unknown --dtype \"" + name + "\" (choose bf16, f16 or f32)");
}

constexpr int64_t kChunkValues = int64_t(1) << 24;  // written at a time: 32 MB of bf16

// Writes chunks to a file on a second thread, so that the pool makes the next chunk while the
// last one goes to disk: writing is bound by the disk, generation by the CPU. It lives inside
// the file's scope, and waits for its last write when it goes.
class ChunkWriter {
 public:
  ChunkWriter(SafetensorsWriter& file, std::vector<uint8_t> (&buffers)[2]) : file_(file), buffers_(buffers) {}
  ~ChunkWriter() {
    if (pending_.valid()) pending_.wait();
  }
  uint8_t* next_buffer() { return buffers_[next_].data(); }  // not in use by a write
  void write(int64_t bytes) {  // next_buffer()'s first `bytes`
    wait();
    pending_ = std::async(std::launch::async, [this, data = next_buffer(), bytes] { file_.append(data, uint64_t(bytes)); });
    next_ ^= 1;
  }
  void wait() {  // rethrows the write's error
    if (pending_.valid()) pending_.get();
  }

 private:
  SafetensorsWriter& file_;
  std::vector<uint8_t> (&buffers_)[2];
  int next_ = 0;
  std::future<void> pending_;
};

// Streams one tensor a chunk at a time, each chunk made by all threads: norm weights (vectors)
// are ones, as HF initializes them; matrices are N(0, 0.02), HF's initializer_range.
void write_tensor(ChunkWriter& writer, const TensorEntry& t, uint64_t seed, cpu::ThreadPool& pool,
                  const std::function<void(int64_t bytes)>& on_written) {
  const int64_t element_bytes = dtype_block(t.dtype).bytes, numel = t.nbytes() / element_bytes;
  const uint64_t key = tensor_key(seed, t.name);
  for (int64_t start = 0; start < numel; start += kChunkValues) {
    const int64_t n = std::min(kChunkValues, numel - start);
    uint8_t* buffer = writer.next_buffer();
    pool.parallel_for(n, 16 * kPiece, [&](int64_t begin, int64_t end) {
      float values[kPiece];
      for (int64_t i = begin; i < end; i += kPiece) {
        const int64_t count = std::min(kPiece, end - i);
        if (t.shape.size() > 1) fill_normal(key, start + i, count, 0.02f, values);
        else std::fill_n(values, count, 1.0f);
        encode(t.dtype, values, count, buffer + i * element_bytes);
      }
    });
    writer.write(n * element_bytes);
    on_written(n * element_bytes);
  }
}

void run(const InitFlags& flags) {
  if (!fs::is_regular_file(flags.config)) throw Error("config not found: " + flags.config);
  const std::string config_text = read_file(flags.config);
  const ModelConfig config = parse_config(config_text, flags.config);
  const DType dtype = parse_dtype(flags.dtype);
  const auto shards = split_into_shards(checkpoint_tensors(config, find_family(config, flags.config).gated_mlp, dtype),
                                        parse_byte_size(flags.shard_size));
  int64_t total_bytes = 0, parameters = 0;
  for (const auto& shard : shards)
    for (const TensorEntry& t : shard) {
      total_bytes += t.nbytes();
      parameters += t.nbytes() / dtype_block(t.dtype).bytes;
    }

  CheckpointFolder folder(flags.out, flags.force);
  folder.check_space(uint64_t(total_bytes));
  const auto start = std::chrono::steady_clock::now();
  folder.write_text("config.json", config_text);
  cpu::ThreadPool pool(0);
  const size_t chunk_bytes = size_t(kChunkValues * dtype_block(dtype).bytes);
  std::vector<uint8_t> buffers[2] = {std::vector<uint8_t>(chunk_bytes), std::vector<uint8_t>(chunk_bytes)};
  const auto progress = progress_bar("writing " + folder.out().filename().string(), "MB");
  int64_t written = 0;
  auto on_written = [&](int64_t bytes) {
    written += bytes;
    if (progress) progress(written >> 20, total_bytes >> 20);
  };
  folder.write_shards(shards, [&](SafetensorsWriter& file, const TensorEntry& t) {
    ChunkWriter writer(file, buffers);
    write_tensor(writer, t, flags.seed, pool, on_written);
    writer.wait();
  });
  folder.commit();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "%swrote %s: %s, %lld parameters, %.1f MB of %s in %zu shard%s, seed %llu, in %.1f s\n",
               progress_line_end(), folder.out().c_str(), config.architecture.c_str(), (long long)parameters,
               total_bytes / 1e6, dtype_name(dtype), shards.size(), shards.size() > 1 ? "s" : "",
               (unsigned long long)flags.seed, seconds);
}

}  // namespace

void add_init_command(CLI::App& app) {
  auto flags = std::make_shared<InitFlags>();
  CLI::App* cmd = app.add_subcommand(
      "init",
      "write a random-weight checkpoint of a config's shape in HF's layout: config.json and safetensors shards "
      "with their index (no tokenizer: afm bench needs none). Matrices are N(0, 0.02), norms 1; the same seed "
      "gives the same bytes. It is written to DIR.partial-XXXXXX and renamed to DIR when complete");
  cmd->add_option("--config", flags->config, "the config.json whose shape to write")->required();
  cmd->add_flag("--random", flags->random, "random weights (the only kind afm init writes)")->required();
  cmd->add_option("--out,-o", flags->out, "the folder to write (must be empty or missing)")->required();
  cmd->add_option("--seed", flags->seed, "seed of the weights")->capture_default_str();
  cmd->add_option("--dtype", flags->dtype, "bf16, f16 or f32")->capture_default_str();
  cmd->add_option("--shard-size", flags->shard_size, "largest shard, as transformers' max_shard_size (5GB, 200MB)")
      ->capture_default_str();
  cmd->add_flag("--force", flags->force, "replace a non-empty --out folder");
  cmd->callback([flags] { run(*flags); });
}

}  // namespace afm::cli
