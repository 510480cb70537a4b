// Paged KV cache. Keys and values live in fixed-size blocks drawn from a shared pool; each
// sequence owns a block table that maps its logical blocks to physical ones, so sequences of
// different lengths share one pool without fragmentation (the vLLM layout).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace afm {

struct KVShape {
  int64_t num_layers = 0, num_kv_heads = 0, head_dim = 0;
  int64_t block_size = 16;  // tokens per block
};

// Storage for blocks. A block holds, for every layer, K then V as [kv_head][slot][head_dim].
class BlockPool {
 public:
  BlockPool(KVShape shape, int64_t max_blocks);

  const KVShape& shape() const { return shape_; }
  int64_t max_blocks() const { return max_blocks_; }
  int64_t free_blocks() const;
  int32_t allocate();  // throws afm::Error when the pool is exhausted
  void release(int32_t block);
  float* keys(int32_t block, int64_t layer);
  float* values(int32_t block, int64_t layer);

 private:
  KVShape shape_;
  int64_t max_blocks_;
  int64_t floats_per_layer_;  // K + V of one layer in one block
  std::vector<std::unique_ptr<float[]>> blocks_;  // allocated on first use
  std::vector<int32_t> free_list_;
};

// One sequence's view of the pool: its block table and how many positions it holds.
class KVCache {
 public:
  KVCache(std::shared_ptr<BlockPool> pool, int64_t max_positions);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const KVShape& shape() const { return pool_->shape(); }
  int64_t length() const { return length_; }          // positions 0..length-1 are filled
  int64_t max_positions() const { return max_positions_; }

  // Make room for positions [0, end); throws afm::Error past max_positions.
  void reserve(int64_t end);
  // Mark positions [0, end) as filled (after the backend wrote them).
  void set_length(int64_t end) { length_ = end; }
  void clear();
  // Forget positions from `length` on, returning whole blocks past it to the pool.
  void truncate(int64_t length);

  // Row of head_dim floats for (layer, kv_head, position).
  float* key(int64_t layer, int64_t kv_head, int64_t pos);
  float* value(int64_t layer, int64_t kv_head, int64_t pos);

 private:
  std::shared_ptr<BlockPool> pool_;
  int64_t max_positions_;
  int64_t length_ = 0;
  std::vector<int32_t> block_table_;
};

}  // namespace afm
