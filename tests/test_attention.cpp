// CPU attention over the paged KV cache: every kernel ISA x cache type, on odd shapes (head_dim
// 64/128/80 and ones that are not a multiple of the vector width, GQA groups 1/2/3/5, contexts
// crossing blocks, one and many query rows, positions not starting at 0, block sizes other than
// 16), against a double-precision softmax attention over plain arrays written here. A SIMD ISA
// the CPU lacks is skipped, saying so.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/attention.h"
#include "backends/cpu/dot.h"
#include "backends/cpu/thread_pool.h"
#include "kv_cache.h"

using afm::KVCacheType;
using afm::cpu::Isa;

namespace {

struct Case {
  int64_t head_dim, group, kv_heads;
  int64_t start, rows;  // query rows at positions start .. start + rows - 1
  int64_t block_size = 16;
  float q_scale = 1;  // larger: peakier softmax
};

std::string describe(const Case& c) {
  return "head_dim " + std::to_string(c.head_dim) + " group " + std::to_string(c.group) + " kv_heads " +
         std::to_string(c.kv_heads) + " start " + std::to_string(c.start) + " rows " + std::to_string(c.rows) +
         " block " + std::to_string(c.block_size) + " q_scale " + std::to_string(c.q_scale);
}

const Case kCases[] = {
    {64, 1, 2, 0, 1},                // decode of the first token
    {128, 5, 4, 0, 1},               // AFM-4.5B's shape
    {128, 5, 4, 700, 1, 16, 3},      // ... decode at a context crossing many blocks
    {128, 5, 1, 600, 1},             // one kv head: the key range split across threads
    {80, 2, 3, 37, 50},              // prefill continuing a cache, tiles and blocks unaligned
    {64, 2, 2, 0, 130, 16, 4},       // prefill from 0, a partial last tile
    {80, 3, 2, 300, 3},              // a few rows at a long context: split, rows at different ends
    {128, 1, 1, 15, 2, 16, 30},      // nearly one-hot softmax, rows either side of a block edge
    {72, 1, 1, 0, 33},               // head_dim 72: AVX-512 tail of 8, AVX2 whole vectors
    {36, 3, 2, 20, 5},               // head_dim 36: AVX-512 tail of 4, AVX2 falls back to scalar
    {64, 2, 1, 5, 40, 4},            // blocks of 4: chunks shorter than a vector
    {64, 4, 2, 29, 70, 32},          // blocks of 32: two chunks per block
};

afm::Tensor make_tensor(int64_t rows, int64_t cols) {
  afm::Tensor t;
  t.rows = rows;
  t.cols = cols;
  t.storage = std::shared_ptr<float[]>(new float[rows * cols]);
  t.data = t.storage.get();
  return t;
}

// softmax(q k^T / sqrt(d)) v in double for query row `t` (at position `pos`) and head `head`, over
// keys/values [position][kv_head][head_dim].
std::vector<double> reference(const Case& c, const float* q_row, int64_t head, int64_t pos,
                              const std::vector<float>& keys, const std::vector<float>& values) {
  const int64_t kv_head = head / c.group, d_n = c.head_dim;
  std::vector<double> scores(pos + 1);
  double max_score = -INFINITY;
  for (int64_t p = 0; p <= pos; p++) {
    double dot = 0;
    for (int64_t d = 0; d < d_n; d++)
      dot += double(q_row[head * d_n + d]) * keys[(p * c.kv_heads + kv_head) * d_n + d];
    scores[p] = dot / std::sqrt(double(d_n));
    max_score = std::max(max_score, scores[p]);
  }
  double sum = 0;
  for (double& s : scores) sum += s = std::exp(s - max_score);
  std::vector<double> out(d_n, 0.0);
  for (int64_t p = 0; p <= pos; p++)
    for (int64_t d = 0; d < d_n; d++) out[d] += scores[p] / sum * values[(p * c.kv_heads + kv_head) * d_n + d];
  return out;
}

// Runs one case; `exact_tolerance` bounds the error against the unrounded inputs (what the cache
// type costs), relative to the largest |value|. Against the values as the cache stores them the
// kernels must agree to f32 summation error whatever the type.
void check(const Case& c, Isa isa, KVCacheType type, double exact_tolerance, afm::cpu::ThreadPool& pool) {
  SCOPED_TRACE(describe(c) + " " + afm::cpu::isa_name(isa) + " " + afm::kv_cache_type_name(type));
  const int64_t total = c.start + c.rows, heads = c.group * c.kv_heads, width = c.kv_heads * c.head_dim;
  const int64_t layers = 2, layer = 1;  // the second layer, so per-layer offsets are exercised
  afm::KVShape shape{layers, c.kv_heads, c.head_dim, c.block_size, type};
  // A second sequence takes every other block of the pool, so the cache's blocks are not
  // physically in order and reading the wrong one shows.
  auto blocks = std::make_shared<afm::BlockPool>(shape, 2 * ((total + c.block_size - 1) / c.block_size));
  afm::KVCache cache(blocks, total), decoy(blocks, total);
  for (int64_t end = 0; end < total;) {
    end = std::min(total, end + c.block_size);
    cache.reserve(end);
    decoy.reserve(end);
  }

  std::mt19937 rng(uint32_t(c.head_dim * 1000 + c.start * 7 + c.rows));
  std::normal_distribution<float> normal;
  std::vector<float> keys(total * width), values(total * width), other(width);
  for (float& x : keys) x = normal(rng);
  for (float& x : values) x = normal(rng);
  for (float& x : other) x = 100 * normal(rng);  // layer 0: values that would show if it were read
  for (int64_t p = 0; p < total; p++)
    for (int64_t h = 0; h < c.kv_heads; h++) {
      cache.write(0, h, p, &other[h * c.head_dim], &other[h * c.head_dim]);
      if (p < c.start) cache.write(layer, h, p, &keys[p * width + h * c.head_dim], &values[p * width + h * c.head_dim]);
    }
  // The query rows' own keys and values go in through cache_update, as in a forward pass.
  afm::Tensor k = make_tensor(c.rows, width), v = make_tensor(c.rows, width), q = make_tensor(c.rows, heads * c.head_dim);
  std::copy_n(&keys[c.start * width], c.rows * width, k.data);
  std::copy_n(&values[c.start * width], c.rows * width, v.data);
  for (int64_t i = 0; i < q.rows * q.cols; i++) q.data[i] = c.q_scale * normal(rng);
  std::vector<int32_t> positions(c.rows);
  for (int64_t t = 0; t < c.rows; t++) positions[t] = int32_t(c.start + t);
  afm::cpu::cache_update(cache, layer, k, v, positions);
  cache.set_length(total);
  for (int64_t p = 0; p < total; p++)  // written last, so a mixed-up block table would clobber the cache
    for (int64_t h = 0; h < c.kv_heads; h++) decoy.write(layer, h, p, &other[h * c.head_dim], &other[h * c.head_dim]);

  // What the cache holds, read back through its own (separately tested) accessors.
  std::vector<float> stored_keys(keys.size()), stored_values(values.size());
  for (int64_t p = 0; p < total; p++)
    for (int64_t h = 0; h < c.kv_heads; h++) {
      cache.read_key(layer, h, p, &stored_keys[p * width + h * c.head_dim]);
      cache.read_value(layer, h, p, &stored_values[p * width + h * c.head_dim]);
    }
  double max_value = 0;
  for (float x : stored_values) max_value = std::max(max_value, double(std::abs(x)));

  afm::Tensor out = make_tensor(c.rows, heads * c.head_dim);
  std::fill_n(out.data, out.rows * out.cols, NAN);
  afm::cpu::attention(q, cache, layer, positions, out, pool, isa);

  double stored_err = 0, exact_err = 0;
  for (int64_t t = 0; t < c.rows; t++)
    for (int64_t head = 0; head < heads; head++) {
      const std::vector<double> want = reference(c, q.row(t), head, positions[t], stored_keys, stored_values);
      const std::vector<double> exact = reference(c, q.row(t), head, positions[t], keys, values);
      for (int64_t d = 0; d < c.head_dim; d++) {
        const double got = out.row(t)[head * c.head_dim + d];
        ASSERT_TRUE(std::isfinite(got)) << "row " << t << " head " << head << " d " << d;
        stored_err = std::max(stored_err, std::abs(got - want[d]));
        exact_err = std::max(exact_err, std::abs(got - exact[d]));
      }
    }
  EXPECT_LE(stored_err, 4e-6 * max_value);
  EXPECT_LE(exact_err, exact_tolerance * max_value);
}

void check_isa(Isa isa) {
  if (!afm::cpu::isa_supported(isa)) GTEST_SKIP() << "this CPU lacks " << afm::cpu::isa_name(isa);
  afm::cpu::ThreadPool pool(3);  // more threads than this CI's cores: splits and tiles interleave
  for (const Case& c : kCases) {
    check(c, isa, KVCacheType::F32, 4e-6, pool);
    check(c, isa, KVCacheType::F16, 2e-3, pool);   // 11 significant bits
    check(c, isa, KVCacheType::BF16, 1.5e-2, pool);  // 8 significant bits
  }
}

TEST(Attention, ScalarMatchesReference) { check_isa(Isa::Scalar); }
TEST(Attention, Avx2MatchesReference) { check_isa(Isa::Avx2); }
TEST(Attention, Avx512MatchesReference) { check_isa(Isa::Avx512); }

// One thread or several, split or not: the same numbers up to f32 summation order.
TEST(Attention, ThreadCountOnlyReordersSums) {
  const Case c{128, 5, 2, 900, 1};
  afm::KVShape shape{1, c.kv_heads, c.head_dim, 16, KVCacheType::F16};
  auto blocks = std::make_shared<afm::BlockPool>(shape, 64);
  afm::KVCache cache(blocks, 1024);
  cache.reserve(c.start + 1);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> row(c.head_dim);
  for (int64_t p = 0; p <= c.start; p++)
    for (int64_t h = 0; h < c.kv_heads; h++) {
      for (float& x : row) x = normal(rng);
      cache.write(0, h, p, row.data(), row.data());
    }
  cache.set_length(c.start + 1);
  afm::Tensor q = make_tensor(1, c.group * c.kv_heads * c.head_dim);
  for (int64_t i = 0; i < q.cols; i++) q.data[i] = normal(rng);
  const int32_t position = int32_t(c.start);
  afm::Tensor one = make_tensor(1, q.cols), many = make_tensor(1, q.cols);
  afm::cpu::ThreadPool single(1), several(4);
  afm::cpu::attention(q, cache, 0, {&position, 1}, one, single);
  afm::cpu::attention(q, cache, 0, {&position, 1}, many, several);
  for (int64_t i = 0; i < q.cols; i++) EXPECT_NEAR(one.data[i], many.data[i], 1e-5) << i;
}

}  // namespace
