// afm._afm: the engine's model, cache, tokenizer and generation loop for Python (nanobind).
// Logits come back as NumPy arrays over the engine's own buffer (no copy); forward and every
// generation step release the GIL, and take turns on one model; afm::Error becomes afm.Error.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <nlohmann/json.hpp>
#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <span>

#include "error.h"
#include "eval.h"
#include "generate.h"
#include "model.h"
#include "model_files.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Logits = nb::ndarray<nb::numpy, float, nb::ndim<2>>;

// A view of a logits tensor that keeps its storage alive for as long as NumPy needs it.
Logits to_numpy(afm::Tensor t) {
  auto* owner = new afm::Tensor(std::move(t));
  nb::capsule release(owner, [](void* p) noexcept { delete static_cast<afm::Tensor*>(p); });
  return Logits(owner->data, {size_t(owner->rows), size_t(owner->cols)}, release);
}

// A tokenizer with its model's chat template and eos ids, loaded from a model path.
struct ModelTokenizer {
  afm::Tokenizer tokenizer;
  std::optional<afm::ChatTemplate> chat_template;
};

ModelTokenizer load_tokenizer(const std::string& path) {
  ModelTokenizer t{afm::load_model_tokenizer(path), std::nullopt};
  try {
    t.chat_template = afm::load_model_chat_template(path);
  } catch (const afm::Error&) {  // a model without one: apply_chat_template says so when called
  }
  return t;
}

// A model and the lock that serialises everything touching it: its backend's thread pool takes
// one caller at a time, and its KV block pool is not thread-safe, so forward passes (which run
// without the GIL) and cache releases from different Python threads take turns.
struct Engine {
  std::unique_ptr<afm::Model> model;
  std::mutex mutex;
};

// A KV cache of an Engine's model; it returns its blocks under the engine's lock.
struct Cache {
  std::shared_ptr<Engine> engine;
  std::unique_ptr<afm::KVCache> cache;

  explicit Cache(std::shared_ptr<Engine> e) : engine(std::move(e)) {
    std::lock_guard lock(engine->mutex);
    cache = engine->model->new_cache();
  }
  // The same positions in a new block table: full blocks shared, the partial last one copied.
  std::unique_ptr<Cache> fork() const {
    std::lock_guard lock(engine->mutex);
    return std::unique_ptr<Cache>(new Cache(engine, cache->fork()));
  }
  ~Cache() {
    std::lock_guard lock(engine->mutex);
    cache.reset();
  }
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

 private:
  Cache(std::shared_ptr<Engine> e, std::unique_ptr<afm::KVCache> c) : engine(std::move(e)), cache(std::move(c)) {}
};

// The model as Python holds it.
struct PyModel {
  std::shared_ptr<Engine> engine;
  const afm::Model& model() const { return *engine->model; }
};

// Runs `tokens` after the positions `cache` holds (the batched forward with one sequence, which
// takes the positions from the cache).
afm::Tensor run(afm::Model& model, std::span<const int32_t> tokens, afm::KVCache& cache, afm::Logits rows) {
  const afm::SequenceInput sequence{tokens, &cache};
  return model.forward(std::span(&sequence, 1), rows);
}

// Several sequences in one forward pass, each continuing its own cache of this model.
afm::Tensor run_batch(PyModel& p, const std::vector<std::vector<int32_t>>& tokens, const std::vector<Cache*>& caches,
                      afm::Logits rows) {
  if (tokens.size() != caches.size())
    throw afm::Error("forward_batch: " + std::to_string(tokens.size()) + " token lists for " +
                     std::to_string(caches.size()) + " caches");
  std::vector<afm::SequenceInput> batch;
  for (size_t i = 0; i < tokens.size(); i++) {
    if (!caches[i]) throw afm::Error("forward_batch: caches[" + std::to_string(i) + "] is None");
    if (caches[i]->engine != p.engine) throw afm::Error("forward_batch: a cache belongs to another model");
    batch.push_back({tokens[i], caches[i]->cache.get()});
  }
  nb::gil_scoped_release unlocked;
  std::lock_guard lock(p.engine->mutex);
  return p.engine->model->forward(batch, rows);
}

using ReferenceLogits = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// One prompt's reference as afm::teacher_forcing_eval takes it; logits may be absent (None).
afm::Reference reference_of(std::vector<int32_t> prompt, std::vector<int32_t> generated,
                            std::optional<ReferenceLogits> logits, std::optional<ReferenceLogits> decode_logits) {
  afm::Reference ref;
  afm::PromptReference& p = ref.prompts.emplace_back();
  p.ids = std::move(prompt);
  p.generated = std::move(generated);
  auto take = [&](const std::optional<ReferenceLogits>& a, size_t rows, const char* name) {
    if (!a) return std::vector<float>{};
    if (a->shape(0) != rows || (ref.vocab_size && int64_t(a->shape(1)) != ref.vocab_size))
      throw afm::Error(std::string("teacher_forcing: ") + name + " must be [" + std::to_string(rows) + ", vocab]");
    ref.vocab_size = int64_t(a->shape(1));
    return std::vector<float>(a->data(), a->data() + a->size());
  };
  p.logits = take(logits, p.ids.size(), "logits");
  p.decode_logits = take(decode_logits, p.generated.size(), "decode_logits");
  return ref;
}

// model.generate(...): one token per next(), each a forward pass without the GIL.
class Generation {
 public:
  Generation(const PyModel& model, const ModelTokenizer& tokenizer, std::vector<int32_t> prompt,
             const afm::GenerateOptions& options)
      : cache_(model.engine),
        generator_(tokenizer.tokenizer, prompt, options, model.model().max_seq_len()),
        pending_(std::move(prompt)) {
    if (pending_.empty()) throw afm::Error("the prompt is empty");
    if (int64_t(pending_.size()) > model.model().max_seq_len())
      throw afm::Error("the prompt has " + std::to_string(pending_.size()) + " tokens but the context holds " +
                       std::to_string(model.model().max_seq_len()));
  }

  // (token id, text): the text may be empty while a character or a possible stop string is held back.
  std::tuple<int32_t, std::string> next() {
    if (generator_.finished()) throw nb::stop_iteration();
    std::string text;
    {
      nb::gil_scoped_release unlocked;
      std::lock_guard lock(cache_.engine->mutex);
      afm::Tensor logits = run(*cache_.engine->model, pending_, *cache_.cache, afm::Logits::Last);
      text = generator_.step({logits.data, size_t(logits.cols)});
    }
    pending_.assign(1, generator_.last_token());
    return {generator_.last_token(), text};
  }

  const std::string& finish_reason() const { return generator_.finish_reason(); }

 private:
  Cache cache_;
  afm::TokenGenerator generator_;
  std::vector<int32_t> pending_;
};

}  // namespace

NB_MODULE(_afm, m) {
  m.doc() = "afm's C++ engine (use the afm package, not this module)";
  nb::exception<afm::Error>(m, "Error", PyExc_RuntimeError);

  nb::class_<Cache>(m, "KVCache")
      .def_prop_ro("length", [](const Cache& c) { return c.cache->length(); }, "positions held")
      .def_prop_ro("max_positions", [](const Cache& c) { return c.cache->max_positions(); })
      .def_prop_ro(
          "blocks", [](const Cache& c) { return std::vector<int32_t>(c.cache->blocks().begin(), c.cache->blocks().end()); },
          "the pool blocks holding its positions, in order (its block table)")
      .def("clear",
           [](Cache& c) {
             std::lock_guard lock(c.engine->mutex);
             c.cache->clear();
           })
      .def("fork", &Cache::fork, "A cache with the same positions, sharing its full blocks (copy on write).")
      .def(
          "truncate",
          [](Cache& c, int64_t length) {
            if (length < 0 || length > c.cache->length())
              throw afm::Error("truncate: " + std::to_string(length) + " is not between 0 and the cache's " +
                               std::to_string(c.cache->length()) + " positions");
            std::lock_guard lock(c.engine->mutex);
            c.cache->truncate(length);
          },
          "length"_a, "Forgets the positions from `length` on.");

  nb::class_<PyModel>(m, "Model")
      .def_prop_ro("vocab_size", [](const PyModel& p) { return p.model().config().vocab_size; })
      .def_prop_ro("max_seq_len", [](const PyModel& p) { return p.model().max_seq_len(); })
      .def_prop_ro("architecture", [](const PyModel& p) { return p.model().config().architecture; })
      .def_prop_ro("weights", [](const PyModel& p) { return afm::format_name(p.model().weight_format()); })
      .def("new_cache", [](const PyModel& p) { return std::make_unique<Cache>(p.engine); })
      .def(
          "reserve_kv",
          [](PyModel& p, int64_t sequences, int64_t positions) {
            std::lock_guard lock(p.engine->mutex);
            const std::shared_ptr<afm::BlockPool>& pool = p.engine->model->kv_pool();
            const int64_t block = pool->shape().block_size;
            // One block more per sequence: a fork copies its partial last block while the original lives.
            pool->grow(sequences * ((std::min(positions, p.model().max_seq_len()) + block - 1) / block + 1));
          },
          "sequences"_a, "positions"_a,
          "Grows the KV block pool to hold `sequences` caches of up to `positions` each at once.")
      .def(
          "forward",
          [](PyModel& p, const std::vector<int32_t>& input_ids, Cache& cache) {
            if (cache.engine != p.engine) throw afm::Error("forward: the cache belongs to another model");
            afm::Tensor logits;
            {
              nb::gil_scoped_release unlocked;
              std::lock_guard lock(p.engine->mutex);
              logits = run(*p.engine->model, input_ids, *cache.cache, afm::Logits::All);
            }
            return to_numpy(std::move(logits));
          },
          "input_ids"_a, "cache"_a,
          "Runs input_ids after the cache's positions; returns logits [len(input_ids), vocab] (float32, no copy).")
      .def(
          "forward_batch",
          [](PyModel& p, const std::vector<std::vector<int32_t>>& tokens, const std::vector<Cache*>& caches,
             bool last_only) {
            return to_numpy(run_batch(p, tokens, caches, last_only ? afm::Logits::Last : afm::Logits::All));
          },
          "tokens"_a, "caches"_a, "last_only"_a,
          "One pass over several sequences, each continuing its cache; logits of every token in turn, or of each "
          "sequence's last token (last_only).")
      .def(
          "teacher_forcing",
          [](PyModel& p, std::vector<int32_t> prompt, std::vector<int32_t> generated,
             std::optional<ReferenceLogits> logits, std::optional<ReferenceLogits> decode_logits) {
            const afm::Reference ref = reference_of(std::move(prompt), std::move(generated), logits, decode_logits);
            afm::PromptResult r;
            {
              nb::gil_scoped_release unlocked;
              std::lock_guard lock(p.engine->mutex);
              r = afm::teacher_forcing_eval(*p.engine->model, ref, false).prompts[0];
            }
            nb::dict out;
            out["prompt_tokens"] = r.prompt_tokens;
            out["steps"] = r.steps;
            out["top1"] = r.top1;
            out["top5"] = r.top5;
            out["prefill_max_rel_err"] = r.prefill_max_rel_err;
            out["decode_max_rel_err"] = r.decode_max_rel_err;
            out["top1_misses"] = r.top1_misses;
            return out;
          },
          "prompt"_a, "generated"_a, "logits"_a.none(), "decode_logits"_a.none(),
          "afm eval's teacher forcing on one prompt and the reference tokens after it (with the reference's logits "
          "where given).");

  m.def(
      "build_model",
      [](const std::string& path, const std::string& device, int64_t max_seq_len, const std::string& weights, int threads) {
        afm::ModelOptions options;
        options.device = afm::Device::parse(device);
        options.max_seq_len = max_seq_len;
        options.weights = afm::parse_weight_format(weights);
        options.num_threads = threads;
        auto engine = std::make_shared<Engine>();
        nb::gil_scoped_release unlocked;
        engine->model = afm::build_model(path, options);
        return PyModel{std::move(engine)};
      },
      "path"_a, "device"_a, "max_seq_len"_a, "weights"_a, "threads"_a);

  nb::class_<ModelTokenizer>(m, "Tokenizer")
      .def_static("load", &load_tokenizer, "path"_a, "From an HF model folder, a GGUF file or a tokenizer.json's folder.")
      .def(
          "encode",
          [](const ModelTokenizer& t, const std::string& text, bool add_special_tokens) {
            return t.tokenizer.encode(text, add_special_tokens);
          },
          "text"_a, "add_special_tokens"_a = true)
      .def(
          "decode",
          [](const ModelTokenizer& t, const std::vector<int32_t>& ids, bool skip_special_tokens) {
            return t.tokenizer.decode(ids, skip_special_tokens);
          },
          "ids"_a, "skip_special_tokens"_a = false)
      .def_prop_ro("vocab_size", [](const ModelTokenizer& t) { return t.tokenizer.vocab_size(); })
      .def(
          "apply_chat_template_json",
          [](const ModelTokenizer& t, const std::string& messages_json, bool add_generation_prompt) {
            if (!t.chat_template) throw afm::Error("this model has no chat template");
            nlohmann::ordered_json messages;
            try {
              messages = nlohmann::ordered_json::parse(messages_json);
            } catch (const nlohmann::json::exception& e) {
              throw afm::Error(std::string("messages are not JSON: ") + e.what());
            }
            return t.chat_template->render(afm::chat_template_context(messages, nullptr, add_generation_prompt));
          },
          "messages_json"_a, "add_generation_prompt"_a)
      .def_prop_ro("end_of_turn_ids", [](const ModelTokenizer& t) { return afm::end_of_turn_token_ids(t.tokenizer); });

  nb::class_<afm::GenerateOptions>(m, "GenerateOptions")
      .def(nb::init<>())
      .def_rw("max_new_tokens", &afm::GenerateOptions::max_new_tokens)
      .def_rw("eos_token_ids", &afm::GenerateOptions::eos_token_ids)
      .def_rw("stop_strings", &afm::GenerateOptions::stop_strings)
      .def(
          "set_sampling",
          [](afm::GenerateOptions& o, bool do_sample, float temperature, float top_p, int top_k, float min_p,
             float repetition_penalty, uint64_t seed) {
            o.sampling = {.do_sample = do_sample, .temperature = temperature, .top_p = top_p, .min_p = min_p,
                          .repetition_penalty = repetition_penalty, .top_k = top_k, .seed = seed};
            afm::validate(o.sampling);
          },
          "do_sample"_a, "temperature"_a, "top_p"_a, "top_k"_a, "min_p"_a, "repetition_penalty"_a, "seed"_a);

  m.def("generation_defaults", [](const std::string& path, const PyModel& model) {
    const afm::ModelConfig& c = model.model().config();
    return afm::load_model_generation_config(path, afm::ModelTokenIds{c.eos_token_ids, c.bos_token_id}).eos_token_ids;
  });

  nb::class_<Generation>(m, "Generation")
      .def(nb::init<const PyModel&, const ModelTokenizer&, std::vector<int32_t>, const afm::GenerateOptions&>(),
           nb::keep_alive<1, 3>())  // the engine lives on in the Generation's cache; the tokenizer is borrowed
      .def("__iter__", [](nb::handle self) { return self; })
      .def("__next__", &Generation::next)
      .def_prop_ro("finish_reason", &Generation::finish_reason);
}
