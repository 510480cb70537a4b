// The decoder on checkpoint shapes no fixture has: MQA and other GQA ratios, head_dim unlike
// hidden/heads, tied embeddings, odd sizes that leave SIMD tails, every rope variant, partial
// rotary, and a prompt far past the original context. Each test writes a random seeded
// checkpoint to a scratch folder and compares afm's logits, at every position, with a forward
// pass in double precision written here from the transformers formulas (modeling_llama,
// modeling_arcee, modeling_rope_utils), sharing no code with the engine: not its config
// parser, not its rope tables. Then it checks that a prefill plus one-token decode steps gives
// the logits of the full pass.
//
// A test that only ever agrees proves little, so each case also has "mutations": the reference
// with one rope parameter changed (truncate, attention_factor, rope type, partial rotary, ...)
// must then disagree with afm by far more than the tolerance, showing that the case is
// sensitive to the very thing it claims to cover.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "model.h"
#include "support/checkpoint_writer.h"

namespace {

using namespace afm_test;

constexpr double kTolerance = 1e-4;         // relative L2 error per row of logits
constexpr double kMutationMinimum = 1e-2;   // a mutated reference must miss by at least this much

// ---------------------------------------------------------------------------------------------
// What a test checkpoint is: one struct, emitted as config.json and read by the reference.

struct Rope {
  std::string type = "default";  // default | linear | yarn | llama3
  double theta = 10000.0;
  double factor = 1.0;
  double partial_rotary_factor = 1.0;
  std::optional<int64_t> original_max_position_embeddings;
  std::optional<double> beta_fast, beta_slow;  // yarn; unset: 32 and 1
  std::optional<double> attention_factor, mscale, mscale_all_dim;
  std::optional<bool> truncate;                // yarn; unset: true
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3 (always written)
};

struct Spec {
  std::string architecture = "ArceeForCausalLM";  // or LlamaForCausalLM
  int64_t hidden = 32, intermediate = 64, layers = 2, heads = 4, kv_heads = 4;
  int64_t head_dim = 0;  // 0: not in config.json, hidden / heads
  int64_t vocab = 64, max_positions = 256;
  double eps = 1e-5;
  bool tied = false;
  std::string dtype = "F32";  // of the weight files: F32 or BF16
  bool v5 = false;            // rope_parameters (v5) instead of rope_theta + rope_scaling (v4)
  Rope rope;
  uint64_t seed = 1;

  bool swiglu() const { return architecture == "LlamaForCausalLM"; }
  int64_t hd() const { return head_dim ? head_dim : hidden / heads; }
};

json config_json(const Spec& s) {
  json c = {
      {"architectures", {s.architecture}},
      {"model_type", s.swiglu() ? "llama" : "arcee"},
      {"hidden_size", s.hidden},
      {"intermediate_size", s.intermediate},
      {"num_hidden_layers", s.layers},
      {"num_attention_heads", s.heads},
      {"num_key_value_heads", s.kv_heads},
      {"vocab_size", s.vocab},
      {"max_position_embeddings", s.max_positions},
      {"rms_norm_eps", s.eps},
      {"hidden_act", s.swiglu() ? "silu" : "relu2"},
      {"tie_word_embeddings", s.tied},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"torch_dtype", s.dtype == "BF16" ? "bfloat16" : "float32"},
  };
  if (s.head_dim) c["head_dim"] = s.head_dim;
  const Rope& r = s.rope;
  json p = json::object();
  p["rope_type"] = r.type;
  if (r.type != "default") p["factor"] = r.factor;
  if (r.original_max_position_embeddings) p["original_max_position_embeddings"] = *r.original_max_position_embeddings;
  if (r.beta_fast) p["beta_fast"] = *r.beta_fast;
  if (r.beta_slow) p["beta_slow"] = *r.beta_slow;
  if (r.attention_factor) p["attention_factor"] = *r.attention_factor;
  if (r.mscale) p["mscale"] = *r.mscale;
  if (r.mscale_all_dim) p["mscale_all_dim"] = *r.mscale_all_dim;
  if (r.truncate) p["truncate"] = *r.truncate;
  if (r.type == "llama3") {
    p["low_freq_factor"] = r.low_freq_factor;
    p["high_freq_factor"] = r.high_freq_factor;
  }
  if (s.v5) {
    p["rope_theta"] = r.theta;
    if (r.partial_rotary_factor != 1.0) p["partial_rotary_factor"] = r.partial_rotary_factor;
    c["rope_parameters"] = p;
  } else {
    c["rope_theta"] = r.theta;
    if (r.partial_rotary_factor != 1.0) c["partial_rotary_factor"] = r.partial_rotary_factor;
    c["rope_scaling"] = r.type == "default" ? json(nullptr) : p;
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Random weights, written to disk and kept (as the file holds them) for the reference.

using Matrix = std::vector<double>;  // row-major [out, in], as nn.Linear stores its weight

struct Layer {
  Matrix attn_norm, q, k, v, o, mlp_norm, gate, up, down;
};
struct Weights {
  Matrix embed, final_norm, lm_head;  // lm_head empty when tied
  std::vector<Layer> layers;
};

// Deterministic on every platform: mt19937_64 is specified bit for bit, Box-Muller is ours.
class Normal {
 public:
  explicit Normal(uint64_t seed) : rng_(seed) {}
  double operator()() {
    const double u1 = (double(rng_() >> 11) + 0.5) * 0x1p-53, u2 = double(rng_() >> 11) * 0x1p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * M_PI * u2);
  }
  uint64_t raw() { return rng_(); }

 private:
  std::mt19937_64 rng_;
};

Weights write_checkpoint(const Spec& s, const fs::path& dir) {
  fs::create_directories(dir);
  write_json(dir / "config.json", config_json(s));
  Normal normal(s.seed);
  TensorMap tensors;
  // mean + std * N(0, 1), rounded to the file's dtype; returns the stored values.
  auto add = [&](const std::string& name, std::vector<int64_t> shape, double mean, double std,
                 const std::string& dtype) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> values(n);
    for (float& x : values) x = float(mean + std * normal());
    tensors[name] = make_tensor(values, std::move(shape), dtype);
    return Matrix(values.begin(), values.end());
  };
  const int64_t q_dim = s.heads * s.hd(), kv_dim = s.kv_heads * s.hd();
  Weights w;
  w.embed = add("model.embed_tokens.weight", {s.vocab, s.hidden}, 0.0, 1.0, s.dtype);
  for (int64_t i = 0; i < s.layers; i++) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    Layer& l = w.layers.emplace_back();
    l.attn_norm = add(p + "input_layernorm.weight", {s.hidden}, 1.0, 0.1, s.dtype);
    l.q = add(p + "self_attn.q_proj.weight", {q_dim, s.hidden}, 0.0, 0.1, s.dtype);
    l.k = add(p + "self_attn.k_proj.weight", {kv_dim, s.hidden}, 0.0, 0.1, s.dtype);
    l.v = add(p + "self_attn.v_proj.weight", {kv_dim, s.hidden}, 0.0, 0.1, s.dtype);
    l.o = add(p + "self_attn.o_proj.weight", {s.hidden, q_dim}, 0.0, 0.08, s.dtype);
    l.mlp_norm = add(p + "post_attention_layernorm.weight", {s.hidden}, 1.0, 0.1, s.dtype);
    if (s.swiglu()) l.gate = add(p + "mlp.gate_proj.weight", {s.intermediate, s.hidden}, 0.0, 0.1, s.dtype);
    l.up = add(p + "mlp.up_proj.weight", {s.intermediate, s.hidden}, 0.0, 0.1, s.dtype);
    l.down = add(p + "mlp.down_proj.weight", {s.hidden, s.intermediate}, 0.0, 0.06, s.dtype);
  }
  w.final_norm = add("model.norm.weight", {s.hidden}, 1.0, 0.1, s.dtype);
  if (!s.tied) w.lm_head = add("lm_head.weight", {s.vocab, s.hidden}, 0.0, 0.1, s.dtype);
  write_safetensors(dir / "model.safetensors", tensors);
  return w;
}

// ---------------------------------------------------------------------------------------------
// The reference, in double precision.

// inv_freq per rope type and the factor cos and sin are scaled by (modeling_rope_utils).
struct RefRope {
  std::vector<double> inv_freq;  // [rotary_dim / 2]
  double attention_scaling = 1.0;
};

RefRope reference_rope(const Spec& s) {
  const Rope& r = s.rope;
  const int64_t dim = int64_t(double(s.hd()) * r.partial_rotary_factor);  // int() truncates
  const double base = r.theta;
  RefRope out;
  std::vector<double> inv(dim / 2);
  for (int64_t i = 0; i < dim / 2; i++) inv[i] = 1.0 / std::pow(base, double(2 * i) / double(dim));
  const double original = double(r.original_max_position_embeddings.value_or(s.max_positions));

  if (r.type == "linear") {
    for (double& f : inv) f /= r.factor;
  } else if (r.type == "yarn") {
    auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    if (r.attention_factor) {
      out.attention_scaling = *r.attention_factor;
    } else if (r.mscale && r.mscale_all_dim && *r.mscale && *r.mscale_all_dim) {
      out.attention_scaling = get_mscale(r.factor, *r.mscale) / get_mscale(r.factor, *r.mscale_all_dim);
    } else {
      out.attention_scaling = get_mscale(r.factor, 1.0);
    }
    const double beta_fast = r.beta_fast && *r.beta_fast ? *r.beta_fast : 32.0;
    const double beta_slow = r.beta_slow && *r.beta_slow ? *r.beta_slow : 1.0;
    auto correction_dim = [&](double rotations) {
      return double(dim) * std::log(original / (rotations * 2 * M_PI)) / (2 * std::log(base));
    };
    double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
    if (r.truncate.value_or(true)) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, double(dim - 1));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < dim / 2; i++) {
      const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
      const double extrapolation_factor = 1.0 - ramp;
      const double extrapolation = inv[i], interpolation = inv[i] / r.factor;
      inv[i] = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
    }
  } else if (r.type == "llama3") {
    const double low_freq_wavelen = original / r.low_freq_factor;
    const double high_freq_wavelen = original / r.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2 * M_PI / f;
      if (wavelen > low_freq_wavelen) {
        f = f / r.factor;
      } else if (!(wavelen < high_freq_wavelen)) {  // medium: smooth between the two
        const double smooth = (original / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        f = (1 - smooth) * f / r.factor + smooth * f;
      }
    }
  }
  out.inv_freq = inv;
  return out;
}

// y[t] = W x[t] for x [T, in], W [out, in].
std::vector<double> linear(const std::vector<double>& x, int64_t T, const Matrix& w, int64_t in, int64_t out) {
  std::vector<double> y(T * out, 0.0);
  for (int64_t t = 0; t < T; t++)
    for (int64_t o = 0; o < out; o++) {
      double sum = 0;
      for (int64_t i = 0; i < in; i++) sum += w[o * in + i] * x[t * in + i];
      y[t * out + o] = sum;
    }
  return y;
}

// LlamaRMSNorm: weight * x / sqrt(mean(x^2) + eps).
std::vector<double> rms_norm(const std::vector<double>& x, int64_t T, const Matrix& weight, double eps) {
  const int64_t n = int64_t(weight.size());
  std::vector<double> y(x.size());
  for (int64_t t = 0; t < T; t++) {
    double ms = 0;
    for (int64_t i = 0; i < n; i++) ms += x[t * n + i] * x[t * n + i];
    const double inv = 1.0 / std::sqrt(ms / double(n) + eps);
    for (int64_t i = 0; i < n; i++) y[t * n + i] = weight[i] * (x[t * n + i] * inv);
  }
  return y;
}

// q * cos + rotate_half(q) * sin on the first rotary_dim dims of each head; the rest pass through.
void apply_rope(std::vector<double>& x, int64_t T, int64_t heads, int64_t head_dim, const RefRope& rope) {
  const int64_t half = int64_t(rope.inv_freq.size());
  for (int64_t t = 0; t < T; t++)  // position t: the reference always runs the whole prompt
    for (int64_t h = 0; h < heads; h++) {
      double* v = &x[(t * heads + h) * head_dim];
      for (int64_t i = 0; i < half; i++) {
        const double angle = double(t) * rope.inv_freq[i];
        const double c = std::cos(angle) * rope.attention_scaling, s = std::sin(angle) * rope.attention_scaling;
        const double a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
}

// Logits [T, vocab] for the prompt at positions 0..T-1.
std::vector<double> reference_forward(const Spec& s, const Weights& w, const std::vector<int32_t>& tokens) {
  const int64_t T = int64_t(tokens.size()), H = s.hidden, D = s.hd(), F = s.intermediate;
  const int64_t q_dim = s.heads * D, kv_dim = s.kv_heads * D, group = s.heads / s.kv_heads;
  const RefRope rope = reference_rope(s);
  const double scale = 1.0 / std::sqrt(double(D));

  std::vector<double> x(T * H);
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < H; i++) x[t * H + i] = w.embed[int64_t(tokens[t]) * H + i];

  for (const Layer& l : w.layers) {
    std::vector<double> h = rms_norm(x, T, l.attn_norm, s.eps);
    std::vector<double> q = linear(h, T, l.q, H, q_dim), k = linear(h, T, l.k, H, kv_dim), v = linear(h, T, l.v, H, kv_dim);
    apply_rope(q, T, s.heads, D, rope);
    apply_rope(k, T, s.kv_heads, D, rope);
    std::vector<double> attn(T * q_dim, 0.0), scores(T);
    for (int64_t t = 0; t < T; t++)
      for (int64_t head = 0; head < s.heads; head++) {
        const int64_t kv = head / group;  // repeat_kv
        const double* qv = &q[t * q_dim + head * D];
        double max_score = -INFINITY;
        for (int64_t p = 0; p <= t; p++) {  // causal
          double dot = 0;
          for (int64_t d = 0; d < D; d++) dot += qv[d] * k[p * kv_dim + kv * D + d];
          scores[p] = dot * scale;
          max_score = std::max(max_score, scores[p]);
        }
        double sum = 0;
        for (int64_t p = 0; p <= t; p++) sum += scores[p] = std::exp(scores[p] - max_score);
        double* o = &attn[t * q_dim + head * D];
        for (int64_t p = 0; p <= t; p++)
          for (int64_t d = 0; d < D; d++) o[d] += scores[p] / sum * v[p * kv_dim + kv * D + d];
      }
    std::vector<double> out = linear(attn, T, l.o, q_dim, H);
    for (int64_t i = 0; i < T * H; i++) x[i] += out[i];

    h = rms_norm(x, T, l.mlp_norm, s.eps);
    std::vector<double> up = linear(h, T, l.up, H, F);
    if (s.swiglu()) {
      const std::vector<double> gate = linear(h, T, l.gate, H, F);
      for (int64_t i = 0; i < T * F; i++) up[i] *= gate[i] / (1.0 + std::exp(-gate[i]));  // silu(gate) * up
    } else {
      for (double& u : up) u = u > 0 ? u * u : 0.0;  // relu(x)^2
    }
    out = linear(up, T, l.down, F, H);
    for (int64_t i = 0; i < T * H; i++) x[i] += out[i];
  }
  const std::vector<double> h = rms_norm(x, T, w.final_norm, s.eps);
  return linear(h, T, s.tied ? w.embed : w.lm_head, H, s.vocab);
}

// ---------------------------------------------------------------------------------------------
// Comparing

// ||a - b|| / ||b|| over one row.
template <typename A, typename B>
double relative_error(const A* a, const B* b, int64_t n) {
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < n; i++) {
    diff += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    norm += double(b[i]) * double(b[i]);
  }
  return std::sqrt(diff / norm);
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> tokens(n);
  for (int32_t& t : tokens) t = int32_t(rng() % uint64_t(vocab));
  return tokens;
}

std::vector<int32_t> iota_positions(int64_t begin, int64_t end) {
  std::vector<int32_t> p;
  for (int64_t i = begin; i < end; i++) p.push_back(int32_t(i));
  return p;
}

struct Mutation {
  std::string what;
  std::function<void(Spec&)> apply;
};

// Write the checkpoint, run afm (full pass, then prefill + decode steps) and the reference, and
// compare; each mutation of the spec must make the reference miss afm by far.
void check_against_reference(const Spec& spec, int64_t prompt_length, int64_t decode_steps,
                             const std::vector<Mutation>& mutations = {}) {
  TempDir tmp("afm_test_shapes_");
  const fs::path dir = tmp.path() / "model";
  const Weights weights = write_checkpoint(spec, dir);
  const std::vector<int32_t> tokens = random_tokens(prompt_length, spec.vocab, spec.seed * 7919 + 1);
  const int64_t T = prompt_length, V = spec.vocab;

  afm::ModelOptions options;
  options.weights = afm::WeightFormat::F32;
  options.max_seq_len = T + 8;
  auto model = afm::build_model(dir.string(), options);
  ASSERT_EQ(model->config().head_dim, spec.hd());

  // One full pass over the prompt.
  auto cache = model->new_cache();
  const afm::Tensor full = model->forward(tokens, iota_positions(0, T), *cache);
  ASSERT_EQ(full.rows, T);
  ASSERT_EQ(full.cols, V);
  const std::vector<float> afm_logits(full.data, full.data + T * V);

  const std::vector<double> ref = reference_forward(spec, weights, tokens);
  double worst = 0;
  int64_t worst_row = 0;
  for (int64_t t = 0; t < T; t++) {
    // Logits that matter: not flat, so a wrong attention or rope cannot hide in the noise.
    double mean = 0, var = 0;
    for (int64_t i = 0; i < V; i++) mean += ref[t * V + i] / double(V);
    for (int64_t i = 0; i < V; i++) var += (ref[t * V + i] - mean) * (ref[t * V + i] - mean) / double(V);
    EXPECT_GT(std::sqrt(var), 0.1) << "reference logits of row " << t << " are nearly flat";
    const double e = relative_error(&afm_logits[t * V], &ref[t * V], V);
    if (e > worst) worst = e, worst_row = t;
    EXPECT_LE(e, kTolerance) << "full pass, position " << t << " of " << T;
  }
  std::printf("[ shapes   ] worst relative error vs the float64 reference: %.3g (position %lld of %lld)\n", worst,
              (long long)worst_row, (long long)T);

  // Prefill then one token at a time: the same logits as the full pass.
  // The model's block pool is sized for one cache of max_seq_len: give the first one back.
  cache.reset();
  const int64_t prefill = T - decode_steps;
  auto cache2 = model->new_cache();
  const std::vector<int32_t> head(tokens.begin(), tokens.begin() + prefill);
  const afm::Tensor first = model->forward(head, iota_positions(0, prefill), *cache2);
  for (int64_t t = 0; t < prefill; t++)
    EXPECT_LE(relative_error(first.row(t), &afm_logits[t * V], V), kTolerance) << "prefill, position " << t;
  for (int64_t t = prefill; t < T; t++) {
    const std::vector<int32_t> one = {tokens[t]};
    const afm::Tensor step = model->forward(one, iota_positions(t, t + 1), *cache2);
    ASSERT_EQ(step.rows, 1);
    EXPECT_LE(relative_error(step.row(0), &afm_logits[t * V], V), kTolerance) << "decode step at position " << t;
    EXPECT_LE(relative_error(step.row(0), &ref[t * V], V), kTolerance) << "decode step vs reference, position " << t;
  }

  // The case is sensitive to what it covers: a reference with that changed misses by far.
  for (const Mutation& m : mutations) {
    Spec mutated = spec;
    m.apply(mutated);
    const std::vector<double> wrong = reference_forward(mutated, weights, tokens);
    double largest = 0;
    for (int64_t t = 0; t < T; t++) largest = std::max(largest, relative_error(&afm_logits[t * V], &wrong[t * V], V));
    std::printf("[ shapes   ] mutation \"%s\": relative error %.3g\n", m.what.c_str(), largest);
    EXPECT_GT(largest, kMutationMinimum) << "afm agrees just as well with a reference where " << m.what
                                         << ", so this case does not test it";
  }
}

// =============================================================================================

// MQA: one key/value head shared by six query heads; relu² MLP; default rope (no rope_scaling).
TEST(Shapes, MultiQueryArceeDefaultRope) {
  Spec s;
  s.architecture = "ArceeForCausalLM";
  s.hidden = 48, s.intermediate = 96, s.layers = 2, s.heads = 6, s.kv_heads = 1;
  s.vocab = 97, s.max_positions = 512, s.eps = 1e-5;
  s.rope.type = "default", s.rope.theta = 10000.0;
  s.seed = 11;
  check_against_reference(s, 40, 6,
                          {{"rope_theta is 500000 instead of 10000", [](Spec& m) { m.rope.theta = 500000.0; }}});
}

// head_dim 24 while hidden / heads is 16; GQA 4 / 2; yarn with an explicit attention_factor and
// truncate false; transformers-v5 config (rope_parameters); BF16 weights.
TEST(Shapes, HeadDimUnlikeHiddenOverHeadsGqaYarnV5) {
  Spec s;
  s.architecture = "ArceeForCausalLM";
  s.hidden = 64, s.intermediate = 128, s.layers = 2, s.heads = 4, s.kv_heads = 2, s.head_dim = 24;
  s.vocab = 80, s.eps = 1e-6, s.dtype = "BF16", s.v5 = true;
  s.rope.type = "yarn", s.rope.theta = 10000.0, s.rope.factor = 4.0;
  s.rope.original_max_position_embeddings = 64, s.max_positions = 256;  // factor = 256 / 64 in every HF version
  s.rope.attention_factor = 1.3, s.rope.truncate = false, s.rope.beta_fast = 16.0, s.rope.beta_slow = 1.0;
  s.seed = 22;
  check_against_reference(
      s, 96, 6,
      {{"truncate is true", [](Spec& m) { m.rope.truncate = true; }},
       {"attention_factor is left to its default", [](Spec& m) { m.rope.attention_factor.reset(); }},
       {"the rope is default instead of yarn", [](Spec& m) { m.rope = Rope{}; }}});
}

// SwiGLU Llama with tied embeddings and llama3 rope; 6 heads / 3 kv heads; hidden 72 and
// intermediate 100, neither a multiple of 16, so every SIMD loop has a tail; head_dim 12.
TEST(Shapes, LlamaTiedLlama3RopeOddSizes) {
  Spec s;
  s.architecture = "LlamaForCausalLM";
  s.hidden = 72, s.intermediate = 100, s.layers = 3, s.heads = 6, s.kv_heads = 3;
  s.vocab = 101, s.max_positions = 1024, s.eps = 1e-5, s.tied = true;
  s.rope.type = "llama3", s.rope.theta = 10000.0, s.rope.factor = 8.0;
  s.rope.low_freq_factor = 1.0, s.rope.high_freq_factor = 4.0, s.rope.original_max_position_embeddings = 256;
  // head_dim 12 gives wavelengths 6.3, 29, 135, 628, 2919, 13541: two high-frequency pairs (kept),
  // one medium (135 in [256 / 4, 256], smoothed) and three low (divided by the factor).
  s.seed = 33;
  check_against_reference(
      s, 64, 6,
      {{"the rope is default instead of llama3", [](Spec& m) { m.rope.type = "default"; }},
       {"high_freq_factor is 2 instead of 4 (medium band moved)", [](Spec& m) { m.rope.high_freq_factor = 2.0; }}});
}

// 700 positions with yarn factor 4 over an original context of 128: far past the original
// context and past max_position_embeddings (512) too, as a long prompt may be.
TEST(Shapes, LongPromptYarnFarPastTheOriginalContext) {
  Spec s;
  s.architecture = "ArceeForCausalLM";
  s.hidden = 32, s.intermediate = 64, s.layers = 2, s.heads = 4, s.kv_heads = 2;
  s.vocab = 64, s.eps = 1e-5;
  s.rope.type = "yarn", s.rope.theta = 10000.0, s.rope.factor = 4.0;
  s.rope.original_max_position_embeddings = 128, s.max_positions = 512;
  s.seed = 44;
  check_against_reference(s, 700, 4,
                          {{"the yarn factor is 2 instead of 4", [](Spec& m) { m.rope.factor = 2.0; }},
                           {"the rope is default instead of yarn", [](Spec& m) { m.rope = Rope{}; }}});
}

// partial_rotary_factor 0.5: only the first half of each head's dims is rotated (pairs i and
// i + rotary_dim / 2), the rest passes through.
TEST(Shapes, PartialRotaryFactor) {
  Spec s;
  s.architecture = "LlamaForCausalLM";
  s.hidden = 64, s.intermediate = 96, s.layers = 2, s.heads = 4, s.kv_heads = 4;
  s.vocab = 72, s.max_positions = 512, s.eps = 1e-6, s.dtype = "BF16";
  s.rope.type = "default", s.rope.theta = 100.0, s.rope.partial_rotary_factor = 0.5;
  s.seed = 55;
  check_against_reference(s, 48, 6,
                          {{"the whole head is rotated", [](Spec& m) { m.rope.partial_rotary_factor = 1.0; }}});
}

// The same in a v5 config (partial_rotary_factor inside rope_parameters), with linear scaling.
TEST(Shapes, PartialRotaryLinearRopeV5) {
  Spec s;
  s.architecture = "ArceeForCausalLM";
  s.hidden = 40, s.intermediate = 72, s.layers = 2, s.heads = 2, s.kv_heads = 1, s.head_dim = 32;
  s.vocab = 66, s.max_positions = 512, s.eps = 1e-5, s.v5 = true;
  s.rope.type = "linear", s.rope.theta = 1000.0, s.rope.factor = 2.0, s.rope.partial_rotary_factor = 0.25;
  s.seed = 66;
  check_against_reference(s, 48, 4,
                          {{"the whole head is rotated", [](Spec& m) { m.rope.partial_rotary_factor = 1.0; }},
                           {"the linear factor is ignored", [](Spec& m) { m.rope.factor = 1.0; }}});
}

}  // namespace
