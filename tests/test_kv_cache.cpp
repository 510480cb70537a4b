// The paged KV cache: block tables, sharing one pool, and its limits.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <random>

#include "error.h"
#include "kv_cache.h"

namespace {

afm::KVShape shape() { return afm::KVShape{2, 2, 4, 4}; }  // 2 layers, 2 kv heads, head_dim 4, 4 tokens per block

TEST(KVCache, BlocksAreTakenOnDemandAndReturnedOnClear) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache cache(pool, 32);
  cache.reserve(5);  // two blocks of 4
  EXPECT_EQ(pool->free_blocks(), 6);
  cache.reserve(8);
  EXPECT_EQ(pool->free_blocks(), 6);
  cache.reserve(9);
  EXPECT_EQ(pool->free_blocks(), 5);
  cache.clear();
  EXPECT_EQ(pool->free_blocks(), 8);
  EXPECT_EQ(cache.length(), 0);
}

TEST(KVCache, APoolGrowsUnderTheCachesThatUseIt) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 2);
  afm::KVCache a(pool, 64);
  a.reserve(8);  // both blocks
  const float key[4] = {1, 2, 3, 4}, value[4] = {5, 6, 7, 8};
  a.write(1, 1, 7, key, value);
  afm::KVCache b(pool, 64);
  EXPECT_THROW(b.reserve(1), afm::Error);  // full
  pool->grow(5);
  pool->grow(3);  // never shrinks
  EXPECT_EQ(pool->max_blocks(), 5);
  EXPECT_EQ(pool->free_blocks(), 3);
  b.reserve(8);  // two new blocks
  a.reserve(9);  // and the third
  EXPECT_EQ(pool->free_blocks(), 0);
  float k[4], v[4];
  a.read_key(1, 1, 7, k);
  a.read_value(1, 1, 7, v);
  for (int d = 0; d < 4; d++) {
    EXPECT_EQ(k[d], key[d]);
    EXPECT_EQ(v[d], value[d]);
  }
  std::vector<int32_t> all(a.blocks().begin(), a.blocks().end());
  all.insert(all.end(), b.blocks().begin(), b.blocks().end());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<int32_t>{0, 1, 2, 3, 4}));  // every block once
  EXPECT_THROW(pool->grow(int64_t(1) << 31), afm::Error);
}

TEST(KVCache, SequencesSharingAPoolKeepTheirOwnValues) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 32), b(pool, 32);
  auto key = [](int layer, int head, int pos, int d) { return float(1000 * layer + 100 * head + 10 * pos + d); };
  for (int pos = 0; pos < 10; pos++) {
    a.reserve(pos + 1);
    b.reserve(pos + 1);  // interleaved allocation: the two block tables alternate physical blocks
    for (int layer = 0; layer < 2; layer++)
      for (int head = 0; head < 2; head++) {
        float ka[4], kb[4], va[4], vb[4];
        for (int d = 0; d < 4; d++) {
          ka[d] = key(layer, head, pos, d);
          kb[d] = -key(layer, head, pos, d);
          va[d] = 0.5f * float(pos);
          vb[d] = -0.5f * float(pos);
        }
        a.write(layer, head, pos, ka, va);
        b.write(layer, head, pos, kb, vb);
      }
  }
  for (int pos = 0; pos < 10; pos++)
    for (int layer = 0; layer < 2; layer++)
      for (int head = 0; head < 2; head++) {
        float ka[4], kb[4], va[4], vb[4];
        a.read_key(layer, head, pos, ka);
        b.read_key(layer, head, pos, kb);
        a.read_value(layer, head, pos, va);
        b.read_value(layer, head, pos, vb);
        for (int d = 0; d < 4; d++) {
          ASSERT_EQ(ka[d], key(layer, head, pos, d));
          ASSERT_EQ(kb[d], -key(layer, head, pos, d));
          ASSERT_EQ(va[d], 0.5f * float(pos));
          ASSERT_EQ(vb[d], -0.5f * float(pos));
        }
      }
}

// The block layout the attention kernels read: keys transposed ([head_dim][slot]), values
// [slot][head_dim], per layer and kv head.
TEST(KVCache, BlocksHoldKeysTransposedAndValuesByRow) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 4);
  afm::KVCache cache(pool, 16);
  cache.reserve(6);
  for (int pos = 0; pos < 6; pos++) {
    const float k[4] = {float(pos), float(pos + 10), float(pos + 20), float(pos + 30)};
    const float v[4] = {-float(pos), -float(pos + 10), -float(pos + 20), -float(pos + 30)};
    cache.write(1, 1, pos, k, v);
  }
  const auto* keys = reinterpret_cast<const float*>(cache.key_block(1, 1, 1));  // positions 4..7
  const auto* values = reinterpret_cast<const float*>(cache.value_block(1, 1, 1));
  for (int d = 0; d < 4; d++)
    for (int slot = 0; slot < 2; slot++) {
      EXPECT_EQ(keys[d * 4 + slot], float(4 + slot + 10 * d));
      EXPECT_EQ(values[slot * 4 + d], -float(4 + slot + 10 * d));
    }
  EXPECT_EQ(reinterpret_cast<uintptr_t>(cache.key_block(0, 0, 0)) % 64, 0u);
}

// IEEE binary16 from its fields, written independently of the cache's converter.
double half_value(uint16_t h) {
  const int exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  const double mag = exp == 0 ? std::ldexp(man, -24) : exp == 0x1F ? INFINITY : std::ldexp(1024 + man, exp - 25);
  return h & 0x8000 ? -mag : mag;
}

// The value nearest to x among `candidates` (ties to the one with the even last bit).
template <class Decode>
double nearest(double x, uint32_t count, Decode decode) {
  double best = 0, best_err = INFINITY;
  uint32_t best_bits = 0;
  for (uint32_t bits = 0; bits < count; bits++) {
    const double v = decode(uint16_t(bits));
    if (std::isnan(v)) continue;
    const double err = std::abs(v - x);
    if (err < best_err || (err == best_err && (bits & 1) == 0 && (best_bits & 1) == 1)) {
      best = v, best_err = err, best_bits = bits;
    }
  }
  return best;
}

// f16 and bf16 caches store each element rounded to nearest even and read it back exactly:
// checked against an exhaustive search over every half / bfloat16 value.
TEST(KVCache, HalfTypesRoundToNearestEven) {
  std::mt19937 rng(3);
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, 65504.0f, 65519.0f, 6.1035156e-05f /* 2^-14 */, 5.9604645e-08f /* 2^-24 */,
                           2.9802322e-08f /* 2^-25: a tie, to 0 */, 8.9406967e-08f /* 1.5 * 2^-24: a tie, to 2^-23 */,
                           1.0f + 0x1p-11f /* a tie, to 1 */, 1.0f + 3 * 0x1p-11f /* a tie, up */, 3.0e38f};
  std::normal_distribution<float> normal;
  for (int i = 0; i < 200; i++) xs.push_back(normal(rng) * std::ldexp(1.0f, int(rng() % 40) - 28));
  auto bf16 = [](uint16_t h) { return double(std::bit_cast<float>(uint32_t(h) << 16)); };
  for (afm::KVCacheType type : {afm::KVCacheType::F16, afm::KVCacheType::BF16}) {
    afm::KVShape s{1, 1, 4, 16, type};
    auto pool = std::make_shared<afm::BlockPool>(s, 1);
    afm::KVCache cache(pool, 16);
    cache.reserve(1);
    for (size_t i = 0; i < xs.size(); i += 4) {
      float k[4] = {}, v[4] = {}, k_back[4], v_back[4];
      for (size_t j = 0; j < 4 && i + j < xs.size(); j++) k[j] = xs[i + j], v[j] = -xs[i + j];
      cache.write(0, 0, 0, k, v);
      cache.read_key(0, 0, 0, k_back);
      cache.read_value(0, 0, 0, v_back);
      for (int j = 0; j < 4; j++) {
        const double want = type == afm::KVCacheType::F16 ? nearest(k[j], 0x10000, half_value)
                                                          : nearest(k[j], 0x10000, bf16);
        // Past the largest finite value (by half an ulp or more) a half is infinity.
        const double expect = type == afm::KVCacheType::F16 && std::abs(k[j]) >= 65520 ? std::copysign(INFINITY, k[j]) : want;
        ASSERT_EQ(double(k_back[j]), expect) << afm::kv_cache_type_name(type) << " " << k[j];
        ASSERT_EQ(double(v_back[j]), -expect) << afm::kv_cache_type_name(type) << " " << v[j];
      }
    }
  }
}

TEST(KVCache, TypesHaveNamesAndSizes) {
  EXPECT_EQ(afm::parse_kv_cache_type("f16"), afm::KVCacheType::F16);
  EXPECT_EQ(afm::parse_kv_cache_type("bf16"), afm::KVCacheType::BF16);
  EXPECT_EQ(afm::parse_kv_cache_type("f32"), afm::KVCacheType::F32);
  EXPECT_THROW(afm::parse_kv_cache_type("int8"), afm::Error);
  afm::KVShape s{36, 4, 128};
  EXPECT_EQ(s.bytes_per_position(), 36 * 2 * 4 * 128 * 4);
  s.type = afm::KVCacheType::BF16;
  EXPECT_EQ(s.bytes_per_position(), 36 * 2 * 4 * 128 * 2);
}

TEST(KVCache, LimitsAreClearErrors) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 2);
  afm::KVCache cache(pool, 12);
  EXPECT_THROW(cache.reserve(13), afm::Error);  // past max_positions
  afm::KVCache other(pool, 12);
  cache.reserve(8);                              // takes both blocks
  try {
    other.reserve(1);
    FAIL() << "expected afm::Error";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("KV cache is full"), std::string::npos);
  }
}

}  // namespace
