// Model::forward over several sequences at once: each sequence's logits must be what it gets alone
// (and, for the fixtures' prompts, what HF transformers computed), whatever else shares the batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "backends/cpu/dot.h"
#include "error.h"
#include "eval.h"
#include "model.h"

namespace {

const std::string kRepo = AFM_SOURCE_DIR;
const std::string kArcee = kRepo + "/tests/fixtures/tiny-arcee";
const std::string kLlama = kRepo + "/tests/fixtures/tiny-llama";

// f32 weights and an f32 cache. max_seq_len 1024 makes the default pool 64 blocks of 16, room for
// every cache these tests hold at once.
std::unique_ptr<afm::Model> load(const std::string& dir) {
  afm::ModelOptions options;
  options.max_seq_len = 1024;
  options.weights = afm::WeightFormat::F32;
  return afm::build_model(dir, options);
}

afm::Model& arcee() {
  static std::unique_ptr<afm::Model> model = load(kArcee);
  return *model;
}

std::vector<int32_t> random_tokens(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(0, 4095);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = id(rng);
  return t;
}

std::vector<int32_t> iota_positions(int64_t start, int64_t n) {
  std::vector<int32_t> p(n);
  std::iota(p.begin(), p.end(), int32_t(start));
  return p;
}

// Logits rows, copied out of the backend's tensor.
struct Rows {
  int64_t rows = 0, cols = 0;
  std::vector<float> data;
  const float* row(int64_t r) const { return data.data() + r * cols; }
};

Rows copy(const afm::Tensor& t) {
  Rows r{t.rows, t.cols, std::vector<float>(t.data, t.data + t.rows * t.cols)};
  return r;
}

// The one-sequence path: `tokens` continuing `cache`.
Rows alone(afm::Model& model, std::span<const int32_t> tokens, afm::KVCache& cache, afm::Logits rows) {
  return copy(model.forward(tokens, iota_positions(cache.length(), int64_t(tokens.size())), cache, rows));
}

// Row `got` against row `want`: every logit within 1e-5 of it, scaled by the row's largest |logit|
// when that is above 1.
::testing::AssertionResult close(const float* got, const float* want, int64_t n, double tolerance = 1e-5) {
  double scale = 1, worst = 0;
  int64_t at = 0;
  for (int64_t i = 0; i < n; i++) scale = std::max(scale, double(std::fabs(want[i])));
  for (int64_t i = 0; i < n; i++) {
    const double d = std::fabs(double(got[i]) - double(want[i]));
    if (!(d <= worst)) worst = d, at = i;  // NaN counts as the worst
  }
  if (worst <= tolerance * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "logit " << at << ": " << got[at] << " vs " << want[at]
                                       << " (max |diff| " << worst << ", allowed " << tolerance * scale << ")";
}

// ||got - want|| / ||want|| for one row, the measure the HF comparisons use.
double row_relative_error(const float* got, const float* want, int64_t n) {
  double diff = 0, norm = 0;
  for (int64_t i = 0; i < n; i++) {
    const double d = double(got[i]) - double(want[i]);
    diff += d * d;
    norm += double(want[i]) * double(want[i]);
  }
  const double e = std::sqrt(diff / norm);
  return std::isfinite(e) ? e : INFINITY;
}

// A new cache per prompt, and the batch feeding each prompt to its cache.
std::pair<std::vector<std::unique_ptr<afm::KVCache>>, std::vector<afm::SequenceInput>> fresh_batch(
    afm::Model& model, const std::vector<std::vector<int32_t>>& prompts) {
  std::vector<std::unique_ptr<afm::KVCache>> caches;
  std::vector<afm::SequenceInput> batch;
  for (const auto& prompt : prompts) {
    caches.push_back(model.new_cache());
    batch.push_back({prompt, caches.back().get()});
  }
  return {std::move(caches), std::move(batch)};
}

struct ThreePrompts {
  std::vector<std::vector<int32_t>> prompts = {random_tokens(5, 1), random_tokens(17, 2), random_tokens(9, 3)};
};

TEST(BatchedForward, LastRowsMatchEachSequenceAlone) {
  afm::Model& model = arcee();
  const int64_t vocab = model.config().vocab_size;
  ThreePrompts p;
  std::vector<Rows> single;
  for (const auto& prompt : p.prompts) {
    auto cache = model.new_cache();
    single.push_back(alone(model, prompt, *cache, afm::Logits::Last));
    ASSERT_EQ(single.back().rows, 1);
  }

  auto [caches, batch] = fresh_batch(model, p.prompts);
  const Rows got = copy(model.forward(batch, afm::Logits::Last));
  ASSERT_EQ(got.rows, 3);
  ASSERT_EQ(got.cols, vocab);
  for (int s = 0; s < 3; s++) {
    EXPECT_TRUE(close(got.row(s), single[s].row(0), vocab)) << "sequence " << s;
    EXPECT_EQ(caches[s]->length(), int64_t(p.prompts[s].size()));
  }
  // The rows differ from one another (a batch that repeated one row would fail above, but make the
  // premise explicit).
  EXPECT_FALSE(close(single[0].row(0), single[1].row(0), vocab));
}

TEST(BatchedForward, AllRowsComeInSequenceOrder) {
  afm::Model& model = arcee();
  const int64_t vocab = model.config().vocab_size;
  ThreePrompts p;
  auto [caches, batch] = fresh_batch(model, p.prompts);
  const Rows got = copy(model.forward(batch, afm::Logits::All));
  ASSERT_EQ(got.rows, 5 + 17 + 9);
  int64_t row = 0;
  for (int s = 0; s < 3; s++) {
    auto cache = model.new_cache();
    const Rows single = alone(model, p.prompts[s], *cache, afm::Logits::All);
    ASSERT_EQ(single.rows, int64_t(p.prompts[s].size()));
    for (int64_t t = 0; t < single.rows; t++, row++)
      ASSERT_TRUE(close(got.row(row), single.row(t), vocab)) << "sequence " << s << " position " << t;
  }
}

TEST(BatchedForward, DecodeStepsForEverySequenceMatchSingleSteps) {
  afm::Model& model = arcee();
  const int64_t vocab = model.config().vocab_size;
  ThreePrompts p;
  const std::vector<int32_t> next = {17, 4000, 256}, after = {3, 2, 1};

  // Alone: prefill, then one decode step, then another.
  std::vector<Rows> step1, step2;
  for (int s = 0; s < 3; s++) {
    auto cache = model.new_cache();
    alone(model, p.prompts[s], *cache, afm::Logits::Last);
    step1.push_back(alone(model, std::span(&next[s], 1), *cache, afm::Logits::Last));
    step2.push_back(alone(model, std::span(&after[s], 1), *cache, afm::Logits::Last));
  }

  auto [caches, batch] = fresh_batch(model, p.prompts);
  model.forward(batch, afm::Logits::Last);
  std::vector<afm::SequenceInput> decode;
  for (int s = 0; s < 3; s++) decode.push_back({std::span(&next[s], 1), caches[s].get()});
  const Rows got1 = copy(model.forward(decode, afm::Logits::Last));
  ASSERT_EQ(got1.rows, 3);
  for (int s = 0; s < 3; s++) {
    EXPECT_TRUE(close(got1.row(s), step1[s].row(0), vocab)) << "sequence " << s;
    EXPECT_EQ(caches[s]->length(), int64_t(p.prompts[s].size()) + 1);
  }

  // A second step in another order, with only two of the sequences: a batch is any subset.
  std::vector<afm::SequenceInput> partial = {{std::span(&after[2], 1), caches[2].get()},
                                             {std::span(&after[0], 1), caches[0].get()}};
  const Rows got2 = copy(model.forward(partial, afm::Logits::Last));
  ASSERT_EQ(got2.rows, 2);
  EXPECT_TRUE(close(got2.row(0), step2[2].row(0), vocab));
  EXPECT_TRUE(close(got2.row(1), step2[0].row(0), vocab));
  EXPECT_EQ(caches[0]->length(), 7);
  EXPECT_EQ(caches[1]->length(), 18);
  EXPECT_EQ(caches[2]->length(), 11);
}

TEST(BatchedForward, PrefillAndDecodeMixInOneBatch) {
  afm::Model& model = arcee();
  const int64_t vocab = model.config().vocab_size;
  const std::vector<int32_t> old_prompt = random_tokens(20, 4), next = {99}, new_prompt = random_tokens(12, 5);

  auto ref_old = model.new_cache(), ref_new = model.new_cache();
  alone(model, old_prompt, *ref_old, afm::Logits::Last);
  const Rows want_old = alone(model, next, *ref_old, afm::Logits::All);
  const Rows want_new = alone(model, new_prompt, *ref_new, afm::Logits::All);

  auto old_cache = model.new_cache(), new_cache = model.new_cache();
  alone(model, old_prompt, *old_cache, afm::Logits::Last);
  std::vector<afm::SequenceInput> batch = {{new_prompt, new_cache.get()}, {next, old_cache.get()}};
  const Rows got = copy(model.forward(batch, afm::Logits::All));
  ASSERT_EQ(got.rows, 13);
  for (int64_t t = 0; t < 12; t++) EXPECT_TRUE(close(got.row(t), want_new.row(t), vocab)) << "position " << t;
  EXPECT_TRUE(close(got.row(12), want_old.row(0), vocab));
  EXPECT_EQ(new_cache->length(), 12);
  EXPECT_EQ(old_cache->length(), 21);
}

// HF's own numbers for the fixture's prompts (5, 98 and 200 tokens), run as one batch, then one
// batched decode step with each prompt's first greedy token.
TEST(BatchedForward, MatchesTransformersForTheReferencePrompts) {
  afm::Model& model = arcee();
  const afm::Reference reference = afm::load_reference(kArcee + "/reference.safetensors");
  const int64_t vocab = model.config().vocab_size;
  ASSERT_EQ(reference.vocab_size, vocab);
  ASSERT_EQ(reference.prompts.size(), 3u);

  std::vector<std::unique_ptr<afm::KVCache>> caches;
  std::vector<afm::SequenceInput> batch;
  int64_t total = 0;
  for (const afm::PromptReference& p : reference.prompts) {
    ASSERT_TRUE(p.logit_rows.empty() && p.decode_rows.empty());
    ASSERT_EQ(p.logits.size(), p.ids.size() * size_t(vocab));
    caches.push_back(model.new_cache());
    batch.push_back({p.ids, caches.back().get()});
    total += int64_t(p.ids.size());
  }
  const Rows got = copy(model.forward(batch, afm::Logits::All));
  ASSERT_EQ(got.rows, total);
  int64_t row = 0;
  for (size_t s = 0; s < reference.prompts.size(); s++) {
    const afm::PromptReference& p = reference.prompts[s];
    for (size_t t = 0; t < p.ids.size(); t++, row++)
      ASSERT_LE(row_relative_error(got.row(row), &p.logits[t * vocab], vocab), 1e-4)
          << "prompt " << s << " position " << t;
  }

  std::vector<afm::SequenceInput> decode;
  for (size_t s = 0; s < reference.prompts.size(); s++)
    decode.push_back({std::span(reference.prompts[s].generated).first(1), caches[s].get()});
  const Rows step = copy(model.forward(decode, afm::Logits::Last));
  ASSERT_EQ(step.rows, 3);
  for (size_t s = 0; s < reference.prompts.size(); s++) {
    const afm::PromptReference& p = reference.prompts[s];
    ASSERT_GE(p.decode_logits.size(), 2 * size_t(vocab));
    EXPECT_LE(row_relative_error(step.row(int64_t(s)), &p.decode_logits[vocab], vocab), 1e-4) << "prompt " << s;
    EXPECT_EQ(caches[s]->length(), int64_t(p.ids.size()) + 1);
  }
}

TEST(BatchedForward, SwiGluFamilyMatchesEachSequenceAlone) {
  auto model = load(kLlama);
  const int64_t vocab = model->config().vocab_size;
  ThreePrompts p;
  std::vector<std::unique_ptr<afm::KVCache>> caches;
  std::vector<afm::SequenceInput> batch;
  for (const auto& prompt : p.prompts) {
    caches.push_back(model->new_cache());
    batch.push_back({prompt, caches.back().get()});
  }
  const Rows got = copy(model->forward(batch, afm::Logits::Last));
  ASSERT_EQ(got.rows, 3);
  for (int s = 0; s < 3; s++) {
    auto cache = model->new_cache();
    const Rows single = alone(*model, p.prompts[s], *cache, afm::Logits::Last);
    EXPECT_TRUE(close(got.row(s), single.row(0), vocab)) << "sequence " << s;
  }
}

TEST(BatchedForward, TwoEntriesSharingACacheThrow) {
  afm::Model& model = arcee();
  auto shared = model.new_cache(), other = model.new_cache();
  const std::vector<int32_t> a = random_tokens(4, 6), b = random_tokens(3, 7);
  std::vector<afm::SequenceInput> batch = {{a, shared.get()}, {b, shared.get()}};
  EXPECT_THROW(model.forward(batch, afm::Logits::Last), afm::Error);
  std::vector<afm::SequenceInput> three = {{a, other.get()}, {b, shared.get()}, {a, shared.get()}};
  EXPECT_THROW(model.forward(three, afm::Logits::Last), afm::Error);
  EXPECT_EQ(shared->length(), 0);
  EXPECT_EQ(other->length(), 0);
}

TEST(BatchedForward, EmptyBatchOrEmptySequenceThrows) {
  afm::Model& model = arcee();
  EXPECT_THROW(model.forward(std::span<const afm::SequenceInput>(), afm::Logits::Last), afm::Error);
  EXPECT_THROW(model.forward(std::span<const afm::SequenceInput>(), afm::Logits::All), afm::Error);
  auto cache = model.new_cache(), other = model.new_cache();
  const std::vector<int32_t> none, some = random_tokens(3, 8);
  std::vector<afm::SequenceInput> alone_empty = {{none, cache.get()}};
  EXPECT_THROW(model.forward(alone_empty, afm::Logits::Last), afm::Error);
  std::vector<afm::SequenceInput> one_empty = {{some, other.get()}, {none, cache.get()}};
  EXPECT_THROW(model.forward(one_empty, afm::Logits::Last), afm::Error);
  EXPECT_EQ(cache->length(), 0);
  EXPECT_EQ(other->length(), 0);
}

// A sequence whose cache starts from another's full blocks and prefills only the rest gets the
// logits of prefilling everything; the blocks it shares are left as they were.
TEST(BatchedForward, ContinuingASharedPrefixMatchesAFullPrefill) {
  afm::Model& model = arcee();
  const int64_t vocab = model.config().vocab_size;
  const afm::KVShape& kv = model.kv_pool()->shape();
  ASSERT_EQ(kv.block_size, 16);
  std::vector<int32_t> prompt = random_tokens(40, 9);

  auto full = model.new_cache();
  const Rows want = alone(model, prompt, *full, afm::Logits::All);

  // The owner of the prefix: a sequence with the same first 32 tokens and a different tail.
  std::vector<int32_t> other = prompt;
  for (int i = 32; i < 40; i++) other[i] = 4095 - i;
  auto owner = model.new_cache();
  alone(model, other, *owner, afm::Logits::All);
  auto snapshot = [&](const afm::KVCache& c) {
    std::vector<float> out;
    std::vector<float> row(kv.head_dim);
    for (int64_t layer = 0; layer < kv.num_layers; layer++)
      for (int64_t head = 0; head < kv.num_kv_heads; head++)
        for (int64_t pos = 0; pos < c.length(); pos++) {
          c.read_key(layer, head, pos, row.data());
          out.insert(out.end(), row.begin(), row.end());
          c.read_value(layer, head, pos, row.data());
          out.insert(out.end(), row.begin(), row.end());
        }
    return out;
  };
  const std::vector<float> owner_before = snapshot(*owner);

  auto shared = model.new_cache();
  shared->share_prefix(owner->blocks().first(2));
  ASSERT_EQ(shared->length(), 32);
  const std::vector<int32_t> rest(prompt.begin() + 32, prompt.end());
  // In a batch with the owner's own decode step.
  const int32_t owner_next = 1234;
  std::vector<afm::SequenceInput> batch = {{rest, shared.get()}, {std::span(&owner_next, 1), owner.get()}};
  const Rows got = copy(model.forward(batch, afm::Logits::All));
  ASSERT_EQ(got.rows, 9);
  for (int64_t t = 0; t < 8; t++) EXPECT_TRUE(close(got.row(t), want.row(32 + t), vocab)) << "position " << 32 + t;
  EXPECT_EQ(shared->length(), 40);
  EXPECT_EQ(owner->length(), 41);
  EXPECT_EQ(shared->blocks()[0], owner->blocks()[0]);
  EXPECT_EQ(shared->blocks()[1], owner->blocks()[1]);
  EXPECT_NE(shared->blocks()[2], owner->blocks()[2]);

  // The owner's positions 0..39 are untouched, and its decode step is the one it gets alone.
  std::vector<float> owner_after = snapshot(*owner);
  auto ref_owner = model.new_cache();
  alone(model, other, *ref_owner, afm::Logits::Last);
  const Rows owner_step = alone(model, std::span(&owner_next, 1), *ref_owner, afm::Logits::Last);
  EXPECT_TRUE(close(got.row(8), owner_step.row(0), vocab));
  // snapshot covers every position of the cache; compare the first 40 of each layer and head.
  const int64_t row = 2 * kv.head_dim;
  for (int64_t lh = 0; lh < kv.num_layers * kv.num_kv_heads; lh++)
    for (int64_t i = 0; i < 40 * row; i++)
      ASSERT_EQ(owner_after[lh * 41 * row + i], owner_before[lh * 40 * row + i]) << "layer/head " << lh;
}

// A batch that fails (here: the second sequence is past its cache's limit) changes no sequence's
// length, and the sequences continue as if it never ran.
TEST(BatchedForward, AFailedBatchLeavesTheCachesUsable) {
  afm::Model& model = arcee();
  const int64_t vocab = model.config().vocab_size;
  const std::vector<int32_t> prompt = random_tokens(16, 10), too_long = random_tokens(9, 11), next = {42};
  auto a = model.new_cache();
  alone(model, prompt, *a, afm::Logits::Last);
  afm::KVCache small(model.kv_pool(), 8);
  std::vector<afm::SequenceInput> batch = {{next, a.get()}, {too_long, &small}};
  EXPECT_THROW(model.forward(batch, afm::Logits::Last), afm::Error);
  EXPECT_EQ(a->length(), 16);
  EXPECT_EQ(small.length(), 0);

  const Rows got = alone(model, next, *a, afm::Logits::Last);
  auto ref = model.new_cache();
  alone(model, prompt, *ref, afm::Logits::Last);
  const Rows want = alone(model, next, *ref, afm::Logits::Last);
  EXPECT_TRUE(close(got.row(0), want.row(0), vocab));
  EXPECT_EQ(a->length(), 17);
}

TEST(BatchedForward, CachesReturnTheirBlocksToTheModelsPool) {
  afm::Model& model = arcee();
  const int64_t free_before = model.kv_pool()->free_blocks();
  {
    ThreePrompts p;
    std::vector<std::unique_ptr<afm::KVCache>> caches;
    std::vector<afm::SequenceInput> batch;
    for (const auto& prompt : p.prompts) {
      caches.push_back(model.new_cache());
      batch.push_back({prompt, caches.back().get()});
    }
    model.forward(batch, afm::Logits::Last);
    EXPECT_EQ(model.kv_pool()->free_blocks(), free_before - (1 + 2 + 1));  // 5, 17, 9 positions
  }
  EXPECT_EQ(model.kv_pool()->free_blocks(), free_before);
}

}  // namespace

// Below the GEMM's 16 rows, the AVX-512 dot kernels sum every token's products in one order
// whatever the group of tokens they share a call with, and attention runs per sequence: a decode
// step of a batch gives each sequence exactly the logits it gets alone. (AVX2's kernels keep more
// FMA chains for one row than for several, so there the results agree only to rounding.)
TEST(BatchedForward, DecodeStepsBelowTheGemmSizeAreBitIdenticalToSingleSteps) {
  if (!afm::cpu::isa_supported(afm::cpu::Isa::Avx512) || afm::cpu::best_isa() == afm::cpu::Isa::Avx2)
    GTEST_SKIP() << "needs the AVX-512 kernels; this CPU or AFM_ISA uses " << afm::cpu::isa_name(afm::cpu::best_isa());
  afm::Model& model = arcee();
  const int64_t vocab = model.config().vocab_size;
  constexpr int kSequences = 7;  // dot kernel groups of 4 and 3 tokens
  std::vector<std::unique_ptr<afm::KVCache>> alone_caches, batch_caches;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<int32_t> next;
  for (int s = 0; s < kSequences; s++) {
    prompts.push_back(random_tokens(3 + 2 * s, 100 + s));
    next.push_back(int32_t(50 * s + 7));
    for (auto* caches : {&alone_caches, &batch_caches}) {
      caches->push_back(model.new_cache());
      alone(model, prompts.back(), *caches->back(), afm::Logits::Last);
    }
  }
  std::vector<afm::SequenceInput> step;
  for (int s = 0; s < kSequences; s++) step.push_back({std::span(&next[s], 1), batch_caches[s].get()});
  const Rows batched = copy(model.forward(step, afm::Logits::Last));
  for (int s = 0; s < kSequences; s++) {
    const Rows single = alone(model, std::span(&next[s], 1), *alone_caches[s], afm::Logits::Last);
    EXPECT_EQ(0, std::memcmp(batched.row(s), single.row(0), size_t(vocab) * sizeof(float))) << "sequence " << s;
  }
}
