// Prompt prefixes kept in the paged KV cache and shared by content: a request whose prompt starts
// with the tokens of an earlier one (a system prompt, a chat history, the n choices of one
// request) takes the earlier one's full blocks into its block table instead of prefilling them.
//
// Block i of a prompt is keyed by a hash of all its tokens up to the end of that block, chained
// from block i - 1's key; entries also keep their tokens and parent, so a hash collision can never
// share the wrong block. The cache owns one reference to each block it records. When the pool
// runs out, it gives back its least recently used blocks that no sequence holds any more.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "kv_cache.h"

namespace afm {

class PrefixCache {
 public:
  // Installs itself as the pool's reclaimer; the pool must outlive it.
  explicit PrefixCache(std::shared_ptr<BlockPool> pool);
  ~PrefixCache();
  PrefixCache(const PrefixCache&) = delete;
  PrefixCache& operator=(const PrefixCache&) = delete;

  // Shares into the empty `cache` the longest recorded prefix of `tokens` that is whole blocks and
  // at most `max_length` positions; returns the number of positions it holds (0 on a miss).
  int64_t attach(std::span<const int32_t> tokens, int64_t max_length, KVCache& cache);
  // How many blocks attach() would share, without counting a query or touching anything.
  int64_t shared_blocks(std::span<const int32_t> tokens, int64_t max_length) const {
    return int64_t(longest_prefix(tokens, max_length, 0).size());
  }
  // Records the full blocks of `cache` holding tokens[0, n), n a length `cache` has written.
  void insert(std::span<const int32_t> tokens, const KVCache& cache);

  int64_t queries() const { return queries_; }
  int64_t hits() const { return hits_; }  // queries that reused at least one block
  int64_t blocks() const { return int64_t(entries_.size()); }
  int64_t evictable_blocks() const;  // recorded blocks no sequence holds: the pool may take them back
  // Gives back one block that only the cache holds, the least recently used; false if none.
  bool evict_one();

 private:
  struct Entry {
    int32_t block;
    uint64_t parent;              // key of the previous block (0 for the first)
    std::vector<int32_t> tokens;  // this block's tokens
    uint64_t last_use;
    int64_t depth;                // index of the block in its prompt
  };
  const Entry* find(uint64_t key, uint64_t parent, std::span<const int32_t> tokens) const;
  // The keys of the longest recorded prefix of whole blocks within max_length; each entry found
  // gets last_use = `use` unless `use` is 0.
  std::vector<uint64_t> longest_prefix(std::span<const int32_t> tokens, int64_t max_length, uint64_t use) const;

  std::shared_ptr<BlockPool> pool_;
  mutable std::unordered_map<uint64_t, Entry> entries_;  // mutable: lookups refresh last_use
  uint64_t clock_ = 0;
  int64_t queries_ = 0, hits_ = 0;
};

}  // namespace afm
