// The paged KV cache: block tables, sharing one pool, and its limits.
#include <gtest/gtest.h>

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

TEST(KVCache, SequencesSharingAPoolKeepTheirOwnValues) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 32), b(pool, 32);
  for (int pos = 0; pos < 10; pos++) {
    a.reserve(pos + 1);
    b.reserve(pos + 1);  // interleaved allocation: the two block tables alternate physical blocks
    for (int layer = 0; layer < 2; layer++)
      for (int head = 0; head < 2; head++)
        for (int d = 0; d < 4; d++) {
          a.key(layer, head, pos)[d] = float(1000 * layer + 100 * head + 10 * pos + d);
          b.key(layer, head, pos)[d] = -float(1000 * layer + 100 * head + 10 * pos + d);
          a.value(layer, head, pos)[d] = 0.5f * float(pos);
          b.value(layer, head, pos)[d] = -0.5f * float(pos);
        }
  }
  for (int pos = 0; pos < 10; pos++)
    for (int layer = 0; layer < 2; layer++)
      for (int head = 0; head < 2; head++)
        for (int d = 0; d < 4; d++) {
          ASSERT_EQ(a.key(layer, head, pos)[d], float(1000 * layer + 100 * head + 10 * pos + d));
          ASSERT_EQ(b.key(layer, head, pos)[d], -float(1000 * layer + 100 * head + 10 * pos + d));
          ASSERT_EQ(a.value(layer, head, pos)[d], 0.5f * float(pos));
          ASSERT_EQ(b.value(layer, head, pos)[d], -0.5f * float(pos));
        }
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
