// AFM-4.5B, read top to bottom as the bring-up note describes it:
//   embedding → for each layer (rms_norm → q/k/v linear → rotary → attention with cache → o linear
//   → residual → rms_norm → up → relu² → down → residual) → norm → lm_head.
// Llama shares all of it but the MLP, which gates `up` with silu(gate).
#include "models/decoder.h"

#include <string>
#include <vector>

#include "error.h"
#include "rope.h"

namespace afm {

namespace {

struct LayerWeights {
  Weight attn_norm, q, k, v, o;
  Weight mlp_norm, gate, up, down;  // gate: SwiGLU only
};

struct DecoderWeights {
  Weight embed, final_norm, lm_head;
  std::vector<LayerWeights> layers;
};

DecoderWeights load_weights(const ModelConfig& c, const Checkpoint& checkpoint, const ModelOptions& options,
                            MlpKind mlp, Backend& backend) {
  const WeightFormat format = options.weights;
  WeightLoader load(checkpoint, options, backend);
  const int64_t hidden = c.hidden_size, ffn = c.intermediate_size;
  const int64_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
  DecoderWeights w;
  // The embedding is a lookup, not a matmul, so it stays exact whatever the weight format.
  w.embed = load.matrix("model.embed_tokens.weight", c.vocab_size, hidden, WeightFormat::F32);
  for (int64_t i = 0; i < c.num_layers; i++) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights& l = w.layers.emplace_back();
    l.attn_norm = load.vector(p + "input_layernorm.weight", hidden);
    l.q = load.matrix(p + "self_attn.q_proj.weight", q_dim, hidden, format);
    l.k = load.matrix(p + "self_attn.k_proj.weight", kv_dim, hidden, format);
    l.v = load.matrix(p + "self_attn.v_proj.weight", kv_dim, hidden, format);
    l.o = load.matrix(p + "self_attn.o_proj.weight", hidden, q_dim, format);
    l.mlp_norm = load.vector(p + "post_attention_layernorm.weight", hidden);
    if (mlp == MlpKind::SwiGLU) l.gate = load.matrix(p + "mlp.gate_proj.weight", ffn, hidden, format);
    l.up = load.matrix(p + "mlp.up_proj.weight", ffn, hidden, format);
    l.down = load.matrix(p + "mlp.down_proj.weight", hidden, ffn, format);
    if (options.on_progress) options.on_progress(i + 1, c.num_layers);
  }
  w.final_norm = load.vector("model.norm.weight", hidden);
  const bool tied = c.tie_word_embeddings && !load.contains("lm_head.weight");
  w.lm_head = load.matrix(tied ? "model.embed_tokens.weight" : "lm_head.weight", c.vocab_size, hidden, format);
  load.check_all_used();
  return w;
}

class Decoder final : public Model {
 public:
  Decoder(ModelContext& context, MlpKind mlp)
      : Model(context),
        mlp_(mlp),
        backend_(std::move(context.backend)),
        weights_(load_weights(config_, context.checkpoint, context.options, mlp, *backend_)),
        rope_(rope_tables(rope_frequencies(config_.rope, config_.head_dim), max_seq_len_)) {
    matmul_weight_bytes_ = weights_.lm_head.bytes();
    for (const LayerWeights& l : weights_.layers)
      for (const Weight* w : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) matmul_weight_bytes_ += w->bytes();
  }

  Tensor forward(std::span<const SequenceInput> batch, Logits rows, const HiddenStateTap& tap) override {
    // The batch's tokens as one matrix, so each weight is read once for all of them; only
    // attention works per sequence, against its own cache.
    const Batch in = concatenate(batch);
    const ModelConfig& c = config_;
    const int64_t T = int64_t(in.tokens.size());
    const float eps = float(c.rms_norm_eps);
    Backend& b = *backend_;

    Tensor x = b.tensor(T, c.hidden_size);     // the residual stream
    Tensor h = b.tensor(T, c.hidden_size);     // normed input of a sublayer, then its output
    Tensor q = b.tensor(T, c.num_heads * c.head_dim), attn = b.tensor(T, c.num_heads * c.head_dim);
    Tensor k = b.tensor(T, c.num_kv_heads * c.head_dim), v = b.tensor(T, c.num_kv_heads * c.head_dim);
    Tensor up = b.tensor(T, c.intermediate_size);
    Tensor gate = mlp_ == MlpKind::SwiGLU ? b.tensor(T, c.intermediate_size) : Tensor{};

    b.embedding(weights_.embed, in.tokens, x);
    for (int64_t layer = 0; layer < c.num_layers; layer++) {
      const LayerWeights& w = weights_.layers[layer];
      if (tap) tap(layer, x);

      b.rms_norm(x, w.attn_norm, eps, h);
      b.linear(h, w.q, q);
      b.linear(h, w.k, k);
      b.linear(h, w.v, v);
      b.rotary(q, c.num_heads, in.positions, rope_);
      b.rotary(k, c.num_kv_heads, in.positions, rope_);
      for (size_t s = 0; s < batch.size(); s++) {
        const int64_t first = in.starts[s], n = int64_t(batch[s].tokens.size());
        const auto positions = std::span(in.positions).subspan(first, n);
        KVCache& cache = *batch[s].cache;
        b.cache_update(cache, layer, row_range(k, first, n), row_range(v, first, n), positions);
        Tensor out = row_range(attn, first, n);
        b.attention(row_range(q, first, n), cache, layer, positions, out);
      }
      b.linear(attn, w.o, h);
      b.add(x, h);

      b.rms_norm(x, w.mlp_norm, eps, h);
      b.linear(h, w.up, up);
      if (mlp_ == MlpKind::ReluSquared) {
        b.relu_squared(up);
        b.linear(up, w.down, h);
      } else {
        b.linear(h, w.gate, gate);
        b.silu_mul(gate, up);
        b.linear(gate, w.down, h);
      }
      b.add(x, h);
    }
    for (size_t s = 0; s < batch.size(); s++) batch[s].cache->set_length(in.positions[in.starts[s + 1] - 1] + 1);

    b.rms_norm(x, weights_.final_norm, eps, h);
    if (tap) tap(c.num_layers, h);
    if (rows == Logits::Last) h = last_rows(h, in.starts);
    Tensor logits = b.tensor(h.rows, c.vocab_size);
    b.linear(h, weights_.lm_head, logits);
    return logits;
  }

 private:
  struct Batch {
    std::vector<int32_t> tokens, positions;  // every sequence's, in turn
    std::vector<int64_t> starts;             // sequence s has rows [starts[s], starts[s + 1])
  };

  Batch concatenate(std::span<const SequenceInput> batch) const {
    if (batch.empty()) throw Error("forward: no sequences");
    for (const SequenceInput& s : batch) {
      if (s.tokens.empty()) throw Error("forward: a sequence has no tokens");
      for (const SequenceInput& other : batch)
        if (&other != &s && other.cache == s.cache) throw Error("forward: two sequences share a cache");
    }
    Batch in;
    in.starts.push_back(0);
    for (const SequenceInput& s : batch) {
      const int64_t begin = s.cache->length(), end = begin + int64_t(s.tokens.size());
      s.cache->reserve(end);  // throws past max_seq_len
      in.tokens.insert(in.tokens.end(), s.tokens.begin(), s.tokens.end());
      for (int64_t p = begin; p < end; p++) in.positions.push_back(int32_t(p));
      in.starts.push_back(int64_t(in.tokens.size()));
    }
    return in;
  }

  // Rows [first, first + n) of t, sharing its storage: no copy, on any device.
  static Tensor row_range(const Tensor& t, int64_t first, int64_t n) {
    return Tensor{t.data + first * t.cols, n, t.cols, t.storage};
  }

  // The last row of each sequence: a view of the only one, or a gathered copy.
  Tensor last_rows(const Tensor& t, const std::vector<int64_t>& starts) {
    if (starts.size() == 2) return row_range(t, t.rows - 1, 1);
    std::vector<int64_t> last(starts.begin() + 1, starts.end());
    for (int64_t& r : last) r--;
    Tensor out = backend_->tensor(int64_t(last.size()), t.cols);
    backend_->gather_rows(t, last, out);
    return out;
  }

  MlpKind mlp_;
  std::unique_ptr<Backend> backend_;
  DecoderWeights weights_;
  RopeTables rope_;
};

}  // namespace

std::unique_ptr<Model> build_decoder(ModelContext& context, MlpKind mlp) {
  const ModelConfig& c = context.config;
  const std::string expected = mlp == MlpKind::ReluSquared ? "relu2" : "silu";
  if (c.hidden_act != expected)
    throw Error(c.architecture + " expects hidden_act \"" + expected + "\", but config.json says \"" + c.hidden_act + "\"");
  if (c.attention_bias || c.mlp_bias) throw Error(c.architecture + ": attention_bias and mlp_bias are not supported");
  return std::make_unique<Decoder>(context, mlp);
}

}  // namespace afm
