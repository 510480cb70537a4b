// Shared KV blocks (owners, fork, share_prefix, copy on write) and the prefix cache on top of them.
// Every expected block count, owner count and eviction order below is worked out by hand from the
// rules in kv_cache.h and prefix_cache.h; contents are checked against the values the test wrote.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include "error.h"
#include "kv_cache.h"
#include "prefix_cache.h"

namespace {

constexpr int64_t kLayers = 2, kHeads = 2, kDim = 4, kBlock = 16;

afm::KVShape shape() { return afm::KVShape{kLayers, kHeads, kDim}; }  // block_size: the default 16

// A distinct value for every (salt, layer, head, pos, d, key or value), exact in f32.
float element(int salt, int64_t layer, int64_t head, int64_t pos, int64_t d, bool is_value) {
  return float(salt * 100000 + layer * 10000 + head * 1000 + pos * 10 + d) * (is_value ? -1.0f : 1.0f) + 0.25f;
}

// Writes positions [from, to) of every layer and head with `salt`'s values and marks them filled.
void fill(afm::KVCache& cache, int64_t from, int64_t to, int salt) {
  cache.reserve(to);
  for (int64_t pos = from; pos < to; pos++)
    for (int64_t layer = 0; layer < kLayers; layer++)
      for (int64_t head = 0; head < kHeads; head++) {
        float k[kDim], v[kDim];
        for (int64_t d = 0; d < kDim; d++) {
          k[d] = element(salt, layer, head, pos, d, false);
          v[d] = element(salt, layer, head, pos, d, true);
        }
        cache.write(layer, head, pos, k, v);
      }
  cache.set_length(std::max(cache.length(), to));
}

// True when positions [from, to) of `cache` hold exactly `salt`'s values.
::testing::AssertionResult holds(const afm::KVCache& cache, int64_t from, int64_t to, int salt) {
  for (int64_t pos = from; pos < to; pos++)
    for (int64_t layer = 0; layer < kLayers; layer++)
      for (int64_t head = 0; head < kHeads; head++) {
        float k[kDim], v[kDim];
        cache.read_key(layer, head, pos, k);
        cache.read_value(layer, head, pos, v);
        for (int64_t d = 0; d < kDim; d++)
          if (k[d] != element(salt, layer, head, pos, d, false) || v[d] != element(salt, layer, head, pos, d, true))
            return ::testing::AssertionFailure() << "position " << pos << " layer " << layer << " head " << head
                                                 << " d " << d << ": key " << k[d] << " value " << v[d]
                                                 << " are not salt " << salt << "'s";
      }
  return ::testing::AssertionSuccess();
}

std::vector<int32_t> ids(std::span<const int32_t> blocks) { return {blocks.begin(), blocks.end()}; }

// Tokens 1000 + salt * 100 + i: distinct across salts for i < 100.
std::vector<int32_t> tokens(int salt, int n) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; i++) t[i] = 1000 + salt * 100 + i;
  return t;
}

// ---------------------------------------------------------------- BlockPool and KVCache sharing

TEST(KVSharing, OwnersCountAndTheLastReleaseFreesTheBlock) {
  afm::BlockPool pool(shape(), 4);
  EXPECT_EQ(pool.max_blocks(), 4);
  EXPECT_EQ(pool.free_blocks(), 4);
  const int32_t a = pool.allocate();
  EXPECT_EQ(pool.owners(a), 1);
  EXPECT_EQ(pool.free_blocks(), 3);
  pool.retain(a);
  pool.retain(a);
  EXPECT_EQ(pool.owners(a), 3);
  pool.release(a);
  pool.release(a);
  EXPECT_EQ(pool.owners(a), 1);
  EXPECT_EQ(pool.free_blocks(), 3);  // still owned once
  pool.release(a);
  EXPECT_EQ(pool.owners(a), 0);
  EXPECT_EQ(pool.free_blocks(), 4);

  // Four distinct blocks, then no fifth (no reclaimer installed).
  std::vector<int32_t> all;
  for (int i = 0; i < 4; i++) all.push_back(pool.allocate());
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(pool.free_blocks(), 0);
  EXPECT_THROW(pool.allocate(), afm::Error);
  // A block released by its only owner is the one handed out next.
  pool.release(all[2]);
  EXPECT_EQ(pool.allocate(), all[2]);
}

TEST(KVSharing, BlockBytesAreKAndVOfEveryLayerPlusPadding) {
  // One layer: K and V of 2 heads x 16 slots x 4 dims, 4 bytes each = 1024 bytes; 2 layers 2048,
  // already 64-byte aligned, then the 64 bytes of padding.
  EXPECT_EQ(afm::BlockPool(shape(), 1).block_bytes(), 2048 + 64);
  afm::KVShape half = shape();
  half.type = afm::KVCacheType::F16;
  EXPECT_EQ(afm::BlockPool(half, 1).block_bytes(), 1024 + 64);
}

TEST(KVSharing, ForkSharesFullBlocksAndCopiesThePartialLastOne) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128);
  fill(a, 0, 40, 1);  // blocks: 16 + 16 full, 8 of the third
  ASSERT_EQ(a.blocks().size(), 3u);
  EXPECT_EQ(pool->free_blocks(), 5);

  std::unique_ptr<afm::KVCache> b = a.fork();
  EXPECT_EQ(b->length(), 40);
  EXPECT_EQ(b->max_positions(), 128);
  ASSERT_EQ(b->blocks().size(), 3u);
  EXPECT_EQ(b->blocks()[0], a.blocks()[0]);
  EXPECT_EQ(b->blocks()[1], a.blocks()[1]);
  EXPECT_NE(b->blocks()[2], a.blocks()[2]);
  EXPECT_EQ(pool->owners(a.blocks()[0]), 2);
  EXPECT_EQ(pool->owners(a.blocks()[1]), 2);
  EXPECT_EQ(pool->owners(a.blocks()[2]), 1);
  EXPECT_EQ(pool->owners(b->blocks()[2]), 1);
  EXPECT_EQ(pool->free_blocks(), 4);  // one block more: the copy
  EXPECT_TRUE(holds(*b, 0, 40, 1));

  // The fork overwrites a kept position of its partial block and appends: the original keeps its own.
  fill(*b, 36, 44, 2);
  EXPECT_TRUE(holds(*b, 0, 36, 1));
  EXPECT_TRUE(holds(*b, 36, 44, 2));
  EXPECT_TRUE(holds(a, 0, 40, 1));
  // And the original appending to its own partial block leaves the fork's alone.
  fill(a, 40, 48, 3);
  EXPECT_TRUE(holds(a, 40, 48, 3));
  EXPECT_TRUE(holds(*b, 36, 44, 2));
}

TEST(KVSharing, ForkOfWholeBlocksCopiesNothing) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128);
  fill(a, 0, 32, 1);
  std::unique_ptr<afm::KVCache> b = a.fork();
  EXPECT_EQ(ids(b->blocks()), ids(a.blocks()));
  EXPECT_EQ(pool->free_blocks(), 6);
  EXPECT_EQ(pool->owners(a.blocks()[1]), 2);
  // Position 32 starts a new block of the fork's own.
  fill(*b, 32, 33, 2);
  EXPECT_EQ(b->blocks().size(), 3u);
  EXPECT_EQ(a.blocks().size(), 2u);
  EXPECT_EQ(pool->free_blocks(), 5);
  EXPECT_TRUE(holds(*b, 0, 32, 1));
  EXPECT_TRUE(holds(*b, 32, 33, 2));
  EXPECT_TRUE(holds(a, 0, 32, 1));
}

TEST(KVSharing, SharePrefixTakesTheBlocksAsOneMoreOwner) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128), b(pool, 128);
  fill(a, 0, 40, 1);
  b.share_prefix(a.blocks().first(2));
  EXPECT_EQ(b.length(), 32);
  EXPECT_EQ(ids(b.blocks()), ids(a.blocks().first(2)));
  EXPECT_EQ(pool->owners(a.blocks()[0]), 2);
  EXPECT_EQ(pool->owners(a.blocks()[1]), 2);
  EXPECT_EQ(pool->owners(a.blocks()[2]), 1);
  EXPECT_EQ(pool->free_blocks(), 5);  // nothing allocated
  EXPECT_TRUE(holds(b, 0, 32, 1));
  // b continues with its own tokens in a block of its own.
  fill(b, 32, 40, 2);
  EXPECT_NE(b.blocks()[2], a.blocks()[2]);
  EXPECT_TRUE(holds(a, 0, 40, 1));
  EXPECT_TRUE(holds(b, 32, 40, 2));
}

TEST(KVSharing, SharePrefixIntoANonEmptyCacheThrows) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128), b(pool, 128);
  fill(a, 0, 32, 1);
  fill(b, 0, 3, 2);
  EXPECT_THROW(b.share_prefix(a.blocks()), afm::Error);
  EXPECT_EQ(b.length(), 3);
  EXPECT_EQ(pool->owners(a.blocks()[0]), 1);  // no reference taken
  EXPECT_TRUE(holds(b, 0, 3, 2));
}

TEST(KVSharing, SharePrefixPastTheContextLimitThrows) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128), small(pool, 20);
  fill(a, 0, 32, 1);
  EXPECT_THROW(small.share_prefix(a.blocks()), afm::Error);  // 32 positions > 20
  EXPECT_EQ(small.length(), 0);
  EXPECT_EQ(pool->owners(a.blocks()[0]), 1);
}

TEST(KVSharing, TruncateIntoASharedBlockMakesItPrivate) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128), b(pool, 128);
  fill(a, 0, 32, 1);
  b.share_prefix(a.blocks());
  EXPECT_EQ(pool->free_blocks(), 6);

  b.truncate(20);  // keeps block 0 (shared, full) and 4 slots of block 1, which b will write again
  EXPECT_EQ(b.length(), 20);
  ASSERT_EQ(b.blocks().size(), 2u);
  EXPECT_EQ(b.blocks()[0], a.blocks()[0]);
  EXPECT_NE(b.blocks()[1], a.blocks()[1]);
  EXPECT_EQ(pool->owners(a.blocks()[0]), 2);
  EXPECT_EQ(pool->owners(a.blocks()[1]), 1);
  EXPECT_EQ(pool->owners(b.blocks()[1]), 1);
  EXPECT_EQ(pool->free_blocks(), 5);
  EXPECT_TRUE(holds(b, 0, 20, 1));

  fill(b, 20, 32, 2);
  EXPECT_TRUE(holds(b, 0, 20, 1));
  EXPECT_TRUE(holds(b, 20, 32, 2));
  EXPECT_TRUE(holds(a, 0, 32, 1));
}

TEST(KVSharing, TruncateByTheOtherOwnerAlsoCopies) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128), b(pool, 128);
  fill(a, 0, 32, 1);
  b.share_prefix(a.blocks());
  const int32_t shared_second = a.blocks()[1];
  a.truncate(25);  // the writer goes back into a block b still reads
  EXPECT_NE(a.blocks()[1], shared_second);
  EXPECT_EQ(b.blocks()[1], shared_second);
  fill(a, 25, 32, 3);
  EXPECT_TRUE(holds(b, 0, 32, 1));
  EXPECT_TRUE(holds(a, 0, 25, 1));
  EXPECT_TRUE(holds(a, 25, 32, 3));
}

TEST(KVSharing, TruncateToABlockBoundaryReleasesWithoutCopying) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128), b(pool, 128);
  fill(a, 0, 32, 1);
  b.share_prefix(a.blocks());
  b.truncate(16);
  EXPECT_EQ(ids(b.blocks()), ids(a.blocks().first(1)));
  EXPECT_EQ(pool->owners(a.blocks()[0]), 2);
  EXPECT_EQ(pool->owners(a.blocks()[1]), 1);
  EXPECT_EQ(pool->free_blocks(), 6);  // no copy was made
  fill(b, 16, 20, 2);                 // a fresh block for position 16
  EXPECT_EQ(pool->free_blocks(), 5);
  EXPECT_TRUE(holds(a, 0, 32, 1));
  EXPECT_TRUE(holds(b, 16, 20, 2));
}

TEST(KVSharing, DestroyingEveryCacheReturnsEveryBlock) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 16);
  {
    afm::KVCache a(pool, 128), b(pool, 128);
    fill(a, 0, 40, 1);
    b.share_prefix(a.blocks().first(2));
    fill(b, 32, 50, 2);
    std::unique_ptr<afm::KVCache> c = a.fork(), d = b.fork();
    c->truncate(10);
    fill(*c, 10, 20, 3);
    d->truncate(33);
    // a: 3 blocks; b: a's first 2 + 2 of its own; c: a private copy of block 0 (cut to 10 inside
    // a shared block) and a new block 1; d: b's first 2, a copy of b's third (cut to 33).
    EXPECT_EQ(pool->free_blocks(), 16 - 3 - 2 - 2 - 1);
  }
  EXPECT_EQ(pool->free_blocks(), 16);
  for (int32_t block = 0; block < 16; block++) EXPECT_EQ(pool->owners(block), 0) << block;
}

TEST(KVSharing, ClearReleasesOnlyThisCachesReferences) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 8);
  afm::KVCache a(pool, 128);
  fill(a, 0, 40, 1);
  std::unique_ptr<afm::KVCache> b = a.fork();
  EXPECT_EQ(pool->free_blocks(), 4);
  a.clear();
  EXPECT_EQ(a.length(), 0);
  EXPECT_TRUE(a.blocks().empty());
  EXPECT_EQ(pool->free_blocks(), 5);  // a's partial block; the full ones stay with b
  EXPECT_TRUE(holds(*b, 0, 40, 1));
  b.reset();
  EXPECT_EQ(pool->free_blocks(), 8);
}

TEST(KVSharing, ReclaimerRunsOnlyWhenThePoolIsExhausted) {
  afm::BlockPool pool(shape(), 2);
  std::vector<int32_t> spare;  // blocks the "reclaimer" may give back
  int calls = 0;
  pool.set_reclaimer([&] {
    calls++;
    if (spare.empty()) return false;
    pool.release(spare.back());
    spare.pop_back();
    return true;
  });
  const int32_t first = pool.allocate();
  spare.push_back(first);
  EXPECT_EQ(calls, 0);  // a block was free
  const int32_t kept = pool.allocate();
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(pool.free_blocks(), 0);

  const int32_t reused = pool.allocate();  // the pool asks the reclaimer, which frees spare[0]
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(reused, first);
  EXPECT_EQ(pool.owners(reused), 1);
  EXPECT_EQ(pool.owners(kept), 1);

  EXPECT_THROW(pool.allocate(), afm::Error);  // nothing left to reclaim
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(pool.owners(kept), 1);
  EXPECT_EQ(pool.owners(reused), 1);
}

TEST(KVSharing, ExhaustedPoolWithoutReclaimerIsAnError) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 2);
  afm::KVCache a(pool, 128);
  fill(a, 0, 32, 1);
  afm::KVCache b(pool, 128);
  EXPECT_THROW(b.reserve(1), afm::Error);
  // A fork of a partial block needs a block for the copy.
  a.truncate(20);
  EXPECT_EQ(pool->free_blocks(), 0);  // truncating a private block frees nothing here
  EXPECT_THROW(a.fork(), afm::Error);
  EXPECT_EQ(pool->owners(a.blocks()[0]), 1);  // the failed fork took no reference
  EXPECT_EQ(pool->owners(a.blocks()[1]), 1);
  EXPECT_TRUE(holds(a, 0, 20, 1));
}

// A cache may hold blocks reserved past its length (a batched forward reserves every sequence's
// room before running, and stops early if a later sequence's reserve fails). A fork must still
// never share a block that either side will write.
// DISABLED: fails on the current code. fork() shares every block of the table and copies only
// the table's last block, and only when length() is not a multiple of the block size; with a
// block reserved ahead, the block holding the partial position (or the reserved one, at a block
// boundary) stays shared and both caches write into it. Enable once KVCache::fork is fixed.
TEST(KVSharing, ForkAfterReservingAheadKeepsWritesApart) {
  auto pool = std::make_shared<afm::BlockPool>(shape(), 16);
  {
    afm::KVCache a(pool, 128);
    a.reserve(48);      // 3 blocks
    fill(a, 0, 20, 1);  // 20 positions: block 1 is the partial one, block 2 is unused
    std::unique_ptr<afm::KVCache> b = a.fork();
    fill(*b, 20, 24, 2);
    fill(a, 20, 24, 3);
    EXPECT_TRUE(holds(a, 0, 20, 1));
    EXPECT_TRUE(holds(a, 20, 24, 3));
    EXPECT_TRUE(holds(*b, 0, 20, 1));
    EXPECT_TRUE(holds(*b, 20, 24, 2)) << "the fork's writes were overwritten by the original's";
  }
  {
    afm::KVCache a(pool, 128);
    a.reserve(40);      // 3 blocks
    fill(a, 0, 32, 1);  // 2 full blocks, block 2 unused
    std::unique_ptr<afm::KVCache> b = a.fork();
    fill(*b, 32, 36, 2);
    fill(a, 32, 36, 3);
    EXPECT_TRUE(holds(a, 32, 36, 3));
    EXPECT_TRUE(holds(*b, 32, 36, 2)) << "the fork's writes were overwritten by the original's";
  }
  EXPECT_EQ(pool->free_blocks(), 16);
}

// ---------------------------------------------------------------- PrefixCache

struct PrefixSetup {
  std::shared_ptr<afm::BlockPool> pool;
  std::unique_ptr<afm::PrefixCache> cache;
  explicit PrefixSetup(int64_t blocks)
      : pool(std::make_shared<afm::BlockPool>(shape(), blocks)), cache(std::make_unique<afm::PrefixCache>(pool)) {}
};

TEST(PrefixCache, AttachSharesTheLongestRecordedPrefixOfWholeBlocks) {
  PrefixSetup s(16);
  const std::vector<int32_t> prompt = tokens(1, 40);
  afm::KVCache writer(s.pool, 128);
  fill(writer, 0, 40, 1);
  s.cache->insert(prompt, writer);
  EXPECT_EQ(s.cache->blocks(), 2);  // 40 tokens: 2 whole blocks
  EXPECT_EQ(s.pool->owners(writer.blocks()[0]), 2);
  EXPECT_EQ(s.pool->owners(writer.blocks()[1]), 2);
  EXPECT_EQ(s.pool->owners(writer.blocks()[2]), 1);  // the partial block is not recorded
  EXPECT_EQ(s.cache->queries(), 0);

  // The same first 40 tokens, then others.
  std::vector<int32_t> longer = prompt;
  for (int i = 0; i < 9; i++) longer.push_back(7 + i);
  afm::KVCache reader(s.pool, 128);
  EXPECT_EQ(s.cache->attach(longer, int64_t(longer.size()) - 1, reader), 32);
  EXPECT_EQ(reader.length(), 32);
  EXPECT_EQ(ids(reader.blocks()), ids(writer.blocks().first(2)));
  EXPECT_EQ(s.pool->owners(writer.blocks()[0]), 3);
  EXPECT_TRUE(holds(reader, 0, 32, 1));
  EXPECT_EQ(s.cache->queries(), 1);
  EXPECT_EQ(s.cache->hits(), 1);
}

TEST(PrefixCache, MaxLengthCapsTheSharedPrefix) {
  PrefixSetup s(16);
  const std::vector<int32_t> prompt = tokens(1, 40);
  afm::KVCache writer(s.pool, 128);
  fill(writer, 0, 40, 1);
  s.cache->insert(prompt, writer);
  const std::pair<int64_t, int64_t> cases[] = {{40, 32}, {33, 32}, {32, 32}, {31, 16}, {17, 16}, {16, 16}, {15, 0}, {0, 0}};
  for (auto [max_length, expected] : cases) {
    afm::KVCache reader(s.pool, 128);
    EXPECT_EQ(s.cache->attach(prompt, max_length, reader), expected) << "max_length " << max_length;
    EXPECT_EQ(reader.length(), expected);
    EXPECT_EQ(int64_t(reader.blocks().size()), expected / kBlock);
    if (expected > 0) {
      EXPECT_TRUE(holds(reader, 0, expected, 1));
    }
  }
  EXPECT_EQ(s.cache->queries(), 8);
  EXPECT_EQ(s.cache->hits(), 6);
}

TEST(PrefixCache, ADifferentTokenEndsTheSharedPrefixAtItsBlock) {
  PrefixSetup s(16);
  const std::vector<int32_t> prompt = tokens(1, 40);
  afm::KVCache writer(s.pool, 128);
  fill(writer, 0, 40, 1);
  s.cache->insert(prompt, writer);

  std::vector<int32_t> at20 = prompt;
  at20[20] = 5;  // block 1 differs
  afm::KVCache r1(s.pool, 128);
  EXPECT_EQ(s.cache->attach(at20, 40, r1), 16);
  EXPECT_EQ(ids(r1.blocks()), ids(writer.blocks().first(1)));
  EXPECT_EQ(s.cache->hits(), 1);

  // A different first token: no block, although block 1's tokens match the recorded block 1 (the
  // key chains from the parent, so block 1 is not reachable without block 0).
  std::vector<int32_t> at0 = prompt;
  at0[0] = 5;
  afm::KVCache r2(s.pool, 128);
  EXPECT_EQ(s.cache->attach(at0, 40, r2), 0);
  EXPECT_EQ(r2.length(), 0);
  EXPECT_TRUE(r2.blocks().empty());
  std::vector<int32_t> at5 = prompt;
  at5[5] = 5;
  EXPECT_EQ(s.cache->attach(at5, 40, r2), 0);
  EXPECT_EQ(s.cache->queries(), 3);
  EXPECT_EQ(s.cache->hits(), 1);  // misses do not count
  // Prompts shorter than one block can share nothing.
  EXPECT_EQ(s.cache->attach(std::span(prompt).first(15), 15, r2), 0);
  EXPECT_EQ(s.cache->queries(), 4);
  EXPECT_EQ(s.cache->hits(), 1);
  EXPECT_EQ(s.pool->owners(writer.blocks()[1]), 2);  // writer and the prefix cache only
}

TEST(PrefixCache, InsertRecordsOnlyBlocksItHasNotSeenAndOnlyWrittenOnes) {
  PrefixSetup s(16);
  const std::vector<int32_t> prompt = tokens(1, 48);
  afm::KVCache writer(s.pool, 128);
  fill(writer, 0, 40, 1);
  s.cache->insert(prompt, writer);  // 48 tokens given, but the cache holds 40: 2 blocks
  EXPECT_EQ(s.cache->blocks(), 2);

  // A second sequence takes the 2 blocks, writes the third, and is recorded: one entry more.
  afm::KVCache second(s.pool, 128);
  EXPECT_EQ(s.cache->attach(prompt, 47, second), 32);
  fill(second, 32, 48, 2);
  s.cache->insert(prompt, second);
  EXPECT_EQ(s.cache->blocks(), 3);
  EXPECT_EQ(s.pool->owners(writer.blocks()[0]), 3);  // writer, second, the cache: no second reference
  EXPECT_EQ(s.pool->owners(second.blocks()[2]), 2);

  afm::KVCache third(s.pool, 128);
  EXPECT_EQ(s.cache->attach(prompt, 48, third), 48);
  EXPECT_TRUE(holds(third, 0, 32, 1));
  EXPECT_TRUE(holds(third, 32, 48, 2));

  // Inserting the same sequence again changes nothing.
  s.cache->insert(prompt, second);
  EXPECT_EQ(s.cache->blocks(), 3);
  EXPECT_EQ(s.pool->owners(second.blocks()[2]), 3);  // second, third, the cache
}

TEST(PrefixCache, ExhaustedPoolEvictsLeastRecentlyUsedBlocksDeepestFirst) {
  PrefixSetup s(6);
  std::vector<std::vector<int32_t>> recorded;  // the blocks of prompts 1, 2, 3
  for (int salt = 1; salt <= 3; salt++) {
    afm::KVCache writer(s.pool, 128);
    fill(writer, 0, 32, salt);
    s.cache->insert(tokens(salt, 32), writer);
    recorded.push_back(ids(writer.blocks()));
  }
  EXPECT_EQ(s.cache->blocks(), 6);
  EXPECT_EQ(s.pool->free_blocks(), 0);  // every block is held by the prefix cache alone
  {
    afm::KVCache touch(s.pool, 128);  // prompt 1 used again: now the most recent
    EXPECT_EQ(s.cache->attach(tokens(1, 32), 32, touch), 32);
  }
  // Least recent first: prompt 2 (inserted before 3), then 3, then 1; within a prompt block 1 first.
  const std::vector<int32_t> expected = {recorded[1][1], recorded[1][0], recorded[2][1],
                                         recorded[2][0], recorded[0][1], recorded[0][0]};
  for (size_t i = 0; i < expected.size(); i++) {
    EXPECT_EQ(s.pool->allocate(), expected[i]) << "allocation " << i;
    EXPECT_EQ(s.cache->blocks(), int64_t(5 - i));
  }
  EXPECT_THROW(s.pool->allocate(), afm::Error);  // nothing left to evict
  for (const auto& blocks : recorded)
    for (int32_t b : blocks) s.pool->release(b);
  EXPECT_EQ(s.pool->free_blocks(), 6);
}

TEST(PrefixCache, EvictionNeverTakesABlockALiveSequenceHolds) {
  PrefixSetup s(6);
  std::vector<int32_t> first_blocks;
  {
    afm::KVCache writer(s.pool, 128);
    fill(writer, 0, 32, 1);
    s.cache->insert(tokens(1, 32), writer);
    first_blocks = ids(writer.blocks());
  }
  afm::KVCache holder(s.pool, 128);  // holds prompt 1's blocks although they are the least recent
  {
    afm::KVCache writer(s.pool, 128);
    fill(writer, 0, 32, 2);
    s.cache->insert(tokens(2, 32), writer);
  }
  EXPECT_EQ(s.cache->attach(tokens(1, 32), 32, holder), 32);
  EXPECT_EQ(s.cache->evict_one(), true);  // prompt 2's block 1: the only evictable entries are 2's
  EXPECT_EQ(s.cache->blocks(), 3);

  // A new sequence of 80 positions needs 5 blocks: 3 free, then prompt 2's last one, then none.
  afm::KVCache big(s.pool, 128);
  EXPECT_EQ(s.pool->free_blocks(), 3);
  fill(big, 0, 64, 3);  // 4 blocks: the 3 free ones and prompt 2's block 0
  EXPECT_EQ(s.cache->blocks(), 2);
  EXPECT_THROW(big.reserve(80), afm::Error);
  EXPECT_EQ(s.cache->blocks(), 2);
  EXPECT_FALSE(s.cache->evict_one());
  EXPECT_EQ(ids(holder.blocks()), first_blocks);
  EXPECT_TRUE(holds(holder, 0, 32, 1));
  EXPECT_TRUE(holds(big, 0, 64, 3));
  for (int32_t b : first_blocks) EXPECT_EQ(s.pool->owners(b), 2);  // holder and the cache

  // Once the holder is gone, its blocks can go too.
  holder.clear();
  EXPECT_TRUE(s.cache->evict_one());
  EXPECT_TRUE(s.cache->evict_one());
  EXPECT_FALSE(s.cache->evict_one());
  EXPECT_EQ(s.cache->blocks(), 0);
  EXPECT_EQ(s.pool->free_blocks(), 2);
}

TEST(PrefixCache, DestroyingItReleasesItsReferences) {
  PrefixSetup s(8);
  afm::KVCache writer(s.pool, 128);
  fill(writer, 0, 40, 1);
  s.cache->insert(tokens(1, 40), writer);
  auto reader = std::make_unique<afm::KVCache>(s.pool, 128);
  EXPECT_EQ(s.cache->attach(tokens(1, 40), 40, *reader), 32);
  EXPECT_EQ(s.pool->owners(writer.blocks()[0]), 3);
  s.cache.reset();
  EXPECT_EQ(s.pool->owners(writer.blocks()[0]), 2);
  EXPECT_EQ(s.pool->owners(writer.blocks()[1]), 2);
  EXPECT_TRUE(holds(*reader, 0, 32, 1));
  reader.reset();
  writer.clear();
  EXPECT_EQ(s.pool->free_blocks(), 8);
  // The pool no longer calls into the destroyed cache: an exhausted pool is a plain error.
  std::vector<int32_t> all;
  for (int i = 0; i < 8; i++) all.push_back(s.pool->allocate());
  EXPECT_THROW(s.pool->allocate(), afm::Error);
  for (int32_t b : all) s.pool->release(b);
}

TEST(PrefixCache, CachedBlocksFreeAfterTheSequencesAreGone) {
  PrefixSetup s(8);
  {
    afm::KVCache writer(s.pool, 128);
    fill(writer, 0, 40, 1);
    s.cache->insert(tokens(1, 40), writer);
  }
  EXPECT_EQ(s.pool->free_blocks(), 6);  // the prefix cache keeps its 2 blocks
  s.cache.reset();
  EXPECT_EQ(s.pool->free_blocks(), 8);
}

}  // namespace
