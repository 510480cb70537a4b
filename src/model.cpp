#include "model.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "blockfloat.h"
#include "error.h"
#include "numeric.h"
#include "multiversion.h"
#include "parallel_for.h"
#include "gguf_model.h"
#include "model_files.h"
#include "models/decoder.h"

namespace afm {

// The model families afm knows, keyed by config.json's "architectures"[0].
// A family whose layers follow the Llama decoder needs only a line here.
struct ModelFamily {
  const char* architecture;
  std::unique_ptr<Model> (*build)(ModelContext&);
};

static const ModelFamily kFamilies[] = {
    {"ArceeForCausalLM", [](ModelContext& c) { return build_decoder(c, MlpKind::ReluSquared); }},
    {"LlamaForCausalLM", [](ModelContext& c) { return build_decoder(c, MlpKind::SwiGLU); }},
};

Device Device::parse(const std::string& name) {
  if (name == "cpu") return {DeviceKind::Cpu};
  if (name == "cuda") return {DeviceKind::Cuda};
  throw Error("unknown device \"" + name + "\" (choose cpu or cuda)");
}

std::string Device::name() const { return kind == DeviceKind::Cpu ? "cpu" : "cuda"; }

std::unique_ptr<Backend> make_cpu_backend(int num_threads);

std::unique_ptr<Backend> make_backend(Device device, int num_threads) {
  if (device.kind == DeviceKind::Cpu) return make_cpu_backend(num_threads);
  throw Error("this build of afm has no " + device.name() + " backend");
}

Weight Backend::load_matrix(const TensorView& view, WeightFormat format, MatmulInputs inputs) {
  Weight w = make_weight(view, format);
  if (is_block_float(w.format)) w.inputs = inputs;
  return upload(std::move(w));
}

KVCacheType default_kv_cache_type(WeightFormat weights) {
  return weights == WeightFormat::F32 ? KVCacheType::F32 : KVCacheType::F16;
}

MatmulInputs default_block_float_inputs(WeightFormat weights) {
  return weights == WeightFormat::BFP4 ? MatmulInputs::Int8 : MatmulInputs::Int16;
}

static KVCacheType chosen_kv_cache_type(const ModelOptions& options) {
  return options.kv_cache.value_or(default_kv_cache_type(options.weights));
}

Model::Model(const ModelContext& context)
    : config_(context.config), max_seq_len_(context.options.max_seq_len), weight_format_(context.options.weights) {
  const ModelConfig& c = config_;
  KVShape shape{c.num_layers, c.num_kv_heads, c.head_dim};
  shape.type = chosen_kv_cache_type(context.options);
  pool_ = std::make_shared<BlockPool>(shape, (max_seq_len_ + shape.block_size - 1) / shape.block_size);
}

void Model::resize_kv_pool(int64_t blocks) {
  if (blocks < 1 || blocks > INT32_MAX) throw Error("the KV pool needs between 1 and 2^31 - 1 blocks");
  if (pool_.use_count() > 1) throw Error("resize_kv_pool: a KV cache of this model still exists");
  pool_ = std::make_shared<BlockPool>(pool_->shape(), blocks);
}

Tensor Model::forward(std::span<const int32_t> tokens, std::span<const int32_t> positions, KVCache& cache,
                      Logits rows, const HiddenStateTap& tap) {
  if (tokens.size() != positions.size()) throw Error("forward: tokens and positions differ in length");
  for (size_t i = 0; i < positions.size(); i++)
    if (positions[i] != cache.length() + int64_t(i))
      throw Error("forward: positions must continue the cache (expected " +
                  std::to_string(cache.length() + int64_t(i)) + ", got " + std::to_string(positions[i]) + ")");
  const SequenceInput sequence{tokens, &cache};
  return forward(std::span(&sequence, 1), rows, tap);
}

const TensorView& WeightLoader::fetch(const std::string& name, std::vector<int64_t> shape) {
  const TensorView& view = checkpoint_.is_random() ? make_random(name, shape) : checkpoint_.get(name);
  if (view.shape != shape) {
    TensorView expected = view;
    expected.shape = shape;
    throw Error(checkpoint_.dir() + ": tensor " + view.describe() + " has the wrong shape; the config implies " +
                expected.describe());
  }
  used_.push_back(name);
  return view;
}

// data[i] for i in [begin, end): spread * uniform(-1, 1), or 1 where spread is 0 (norm weights).
AFM_VECTORIZED_CLONES static void fill_random_bf16(uint16_t* data, int64_t begin, int64_t end, uint64_t key,
                                                   float spread) {
  for (int64_t i = begin; i < end; i++) {
    const float uniform = float(mix64(key + uint64_t(i) * kGolden) >> 40) * 0x1p-24f * 2 - 1;
    data[i] = f32_to_bf16(spread == 0 ? 1.0f : spread * uniform);
  }
}

const TensorView& WeightLoader::make_random(const std::string& name, std::vector<int64_t> shape) {
  if (auto it = random_.find(name); it != random_.end()) return it->second;  // tied weights share
  TensorView view;
  view.name = name;
  view.dtype = DType::BF16;
  view.shape = shape;
  view.nbytes = view.numel() * 2;
  auto data = std::shared_ptr<uint16_t[]>(new uint16_t[view.numel()]);
  // Uniform noise with the spread of HF's initializer (std 0.02); norm weights are ones. Each
  // value is a hash of its index (splitmix64), so threads fill their ranges independently and
  // the result does not depend on how many there are.
  const uint64_t key = *checkpoint_.random_seed() ^ std::hash<std::string>{}(name);
  const float spread = shape.size() == 1 ? 0.0f : 0.0346f;
  parallel_for(view.numel(), 1 << 16,
               [&](int64_t begin, int64_t end) { fill_random_bf16(data.get(), begin, end, key, spread); });
  view.data = reinterpret_cast<const uint8_t*>(data.get());
  view.owner = data;
  return random_.emplace(name, std::move(view)).first->second;
}

Weight WeightLoader::matrix(const std::string& name, int64_t rows, int64_t cols, WeightFormat format) {
  Weight w = backend_.load_matrix(fetch(name, {rows, cols}), format, block_float_inputs_);
  // A made-up tensor lives on only in a Weight that points at it; converted, it can go (a tied
  // weight asked for again is made again, with the same values).
  random_.erase(name);
  return w;
}

Weight WeightLoader::vector(const std::string& name, int64_t size) {
  Weight w = make_weight(fetch(name, {size}), WeightFormat::F32);
  random_.erase(name);
  return backend_.upload(std::move(w));
}

void WeightLoader::check_all_used() const {
  for (const auto& [name, view] : checkpoint_.tensors()) {
    // Some exporters save the rotary buffer; it is recomputed from the config.
    if (name.ends_with("rotary_emb.inv_freq")) continue;
    if (std::find(used_.begin(), used_.end(), name) == used_.end())
      throw Error(checkpoint_.dir() + ": unexpected tensor " + view.describe() +
                  " (the config and the weights disagree, or this is not a " + "plain checkpoint of this family)");
  }
}

int64_t available_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib;
  while (meminfo >> key >> kib) {
    if (key == "MemAvailable:") return kib * 1024;
    meminfo.ignore(256, '\n');
  }
  return 0;
}

// Bytes of K and V one position takes in the cache, over every layer (double: a hostile config's
// sizes must not overflow before they are refused).
static double kv_bytes_per_position(const ModelConfig& c, const ModelOptions& options) {
  return double(c.num_layers) * 2 * double(c.num_kv_heads) * double(c.head_dim) *
         double(kv_element_bytes(chosen_kv_cache_type(options)));
}

// Bytes the weights will take in memory in the chosen format (before any is loaded).
static double resident_weight_bytes(const Checkpoint& checkpoint, WeightFormat format) {
  double bytes = 0;
  for (const auto& [name, view] : checkpoint.tensors())
    if (view.dtype != DType::I64 && view.dtype != DType::I32) bytes += double(weight_bytes(view, format));
  return bytes;
}

// `budget`: the memory the weights and the KV cache may take (0: unknown).
static int64_t choose_max_seq_len(const ModelConfig& c, const ModelOptions& options, double budget, double weights) {
  const int64_t requested = options.max_seq_len;
  // Positions are int32 in the op set.
  if (requested < 0 || requested > INT32_MAX) throw Error("max_seq_len must be between 1 and 2^31 - 1");
  if (requested > 0) return requested;
  // Default: the config's limit, capped so a full KV cache and the RoPE cos/sin tables take at
  // most half the memory the weights leave.
  const double bytes_per_token = kv_bytes_per_position(c, options) + double(c.head_dim) * sizeof(float);
  int64_t limit = c.max_position_embeddings;
  if (budget > 0) limit = std::min(limit, int64_t(std::max(budget - weights, 0.0) / 2 / bytes_per_token));
  return std::max<int64_t>(limit, 1);
}

// The family for config.architecture; `source` names the config in the error.
static const ModelFamily& find_family(const ModelConfig& config, const std::string& source) {
  for (const ModelFamily& f : kFamilies)
    if (config.architecture == f.architecture) return f;
  std::string known;
  for (const ModelFamily& f : kFamilies) known += std::string(known.empty() ? "" : ", ") + f.architecture;
  throw Error(source + ": unknown architecture \"" + config.architecture + "\" (afm supports " + known + ")");
}

static std::string memory_size(double bytes) {
  char text[32];
  if (bytes >= 1e9) std::snprintf(text, sizeof text, "%.2f GB", bytes / 1e9);
  else std::snprintf(text, sizeof text, "%.1f MB", bytes / 1e6);
  return text;
}

// Refuses, before any weight is converted, a model whose weights and one full-length KV cache
// would not fit the memory budget, saying what to lower.
static void check_memory_budget(const ModelConfig& c, const ModelOptions& options, double budget, double weights) {
  if (budget <= 0) return;  // unknown: nothing to check against
  const double kv = double(options.max_seq_len) * kv_bytes_per_position(c, options);
  if (weights + kv <= budget) return;
  throw Error("the model needs about " + memory_size(weights + kv) + " (weights " + memory_size(weights) + " as " +
              format_name(options.weights) + ", KV cache " + memory_size(kv) + " for " + std::to_string(options.max_seq_len) +
              " positions) but " + memory_size(budget) + (options.max_memory > 0 ? " is the --max-memory budget" : " is available") +
              ": use smaller --weights (bfp8, bfp4), a lower --max-seq-len, or --kv-cache f16");
}

std::unique_ptr<Model> build_model(const ModelConfig& config, Checkpoint checkpoint, const ModelOptions& options) {
  const ModelFamily& family = find_family(config, "config");
  const double budget = double(options.max_memory > 0 ? options.max_memory : available_memory());
  const double weights = resident_weight_bytes(checkpoint, options.weights);
  ModelOptions chosen = options;
  chosen.max_seq_len = choose_max_seq_len(config, options, budget, weights);
  check_memory_budget(config, chosen, budget, weights);
  ModelContext context{config, std::move(checkpoint), chosen, make_backend(options.device, options.num_threads)};
  return family.build(context);
}

std::unique_ptr<Model> build_model(const std::string& path, const ModelOptions& options) {
  if (is_gguf_path(path)) {
    const GGUFFile file = GGUFFile::open(path);
    const ModelConfig config = gguf_model_config(file);
    return build_model(config, gguf_checkpoint(file, config), options);
  }
  namespace fs = std::filesystem;
  const std::string& dir = path;
  if (!fs::is_directory(dir)) throw Error("model not found: " + dir + " (expected an HF model folder or a .gguf file)");
  const std::string config_path = (fs::path(dir) / "config.json").string();
  const ModelConfig config = load_config(config_path);
  find_family(config, config_path);  // before mapping any weights
  return build_model(config, Checkpoint::open(dir), options);
}

}  // namespace afm
