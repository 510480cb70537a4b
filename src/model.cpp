#include "model.h"

#include <algorithm>
#include <climits>
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

KVCacheType default_kv_cache_type(WeightFormat weights) {
  return weights == WeightFormat::F32 ? KVCacheType::F32 : KVCacheType::F16;
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
  Weight w = make_weight(fetch(name, {rows, cols}), format);
  if (is_block_float(w.format)) w.inputs = block_float_inputs_;
  // A made-up tensor lives on only in a Weight that points at it; converted, it can go (a tied
  // weight asked for again is made again, with the same values).
  random_.erase(name);
  return w;
}

Weight WeightLoader::vector(const std::string& name, int64_t size) {
  Weight w = make_weight(fetch(name, {size}), WeightFormat::F32);
  random_.erase(name);
  return w;
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

static int64_t choose_max_seq_len(const ModelConfig& c, const ModelOptions& options) {
  const int64_t requested = options.max_seq_len;
  // Positions are int32 in the op set.
  if (requested < 0 || requested > INT32_MAX) throw Error("max_seq_len must be between 1 and 2^31 - 1");
  if (requested > 0) return requested;
  // Default: the config's limit, capped so a full KV cache and the RoPE cos/sin tables take at
  // most half the free memory.
  const int64_t bytes_per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * kv_element_bytes(chosen_kv_cache_type(options)) +
                                  c.head_dim * int64_t(sizeof(float));
  const int64_t memory = available_memory();
  int64_t limit = c.max_position_embeddings;
  if (memory > 0) limit = std::min(limit, memory / 2 / bytes_per_token);
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

std::unique_ptr<Model> build_model(const ModelConfig& config, Checkpoint checkpoint, const ModelOptions& options) {
  const ModelFamily& family = find_family(config, "config");
  ModelContext context{config, std::move(checkpoint), options, make_backend(options.device, options.num_threads)};
  context.options.max_seq_len = choose_max_seq_len(config, options);
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
