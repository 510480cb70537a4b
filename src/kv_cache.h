// Paged KV cache. Keys and values live in fixed-size blocks drawn from a shared pool; each
// sequence owns a block table that maps its logical blocks to physical ones, so sequences of
// different lengths share one pool without fragmentation (the vLLM layout).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace afm {

// The element type of cached keys and values, fixed when the pool is made. F32 keeps the cache
// exact; F16 (11 significant bits, range ±65504) and BF16 (8 bits, f32's range) halve the bytes
// that every decode step reads at long contexts. Rows are written rounded to nearest even and
// widened exactly to f32 when read.
enum class KVCacheType { F32, F16, BF16 };

const char* kv_cache_type_name(KVCacheType type);          // "f32", "f16", "bf16"
KVCacheType parse_kv_cache_type(const std::string& name);  // throws afm::Error for another name
int64_t kv_element_bytes(KVCacheType type);                // 4 or 2

struct KVShape {
  int64_t num_layers = 0, num_kv_heads = 0, head_dim = 0;
  int64_t block_size = 16;  // tokens per block
  KVCacheType type = KVCacheType::F32;

  int64_t element_bytes() const { return kv_element_bytes(type); }
  // Bytes of K and V of one position, over every layer and kv head.
  int64_t bytes_per_position() const { return num_layers * 2 * num_kv_heads * head_dim * element_bytes(); }
};

// Storage for blocks. A block holds, for every layer, K then V. Keys are stored transposed,
// [kv_head][head_dim][slot], so attention scores a block's slots as one SIMD vector per head_dim
// element with no horizontal sums; values stay [kv_head][slot][head_dim], the layout the weighted
// sum of value rows wants. Each block is 64-byte aligned and followed by 64 bytes of padding, so a
// kernel may load a whole vector of slots past the last one of a short block (lanes it then masks).
//
// A block may have several owners (sequences sharing a prompt prefix, forks, a prefix cache): it
// returns to the free list when the last one releases it. Not thread-safe: one thread (the
// scheduler's, or the caller's) drives a pool and every cache on it.
class BlockPool {
 public:
  BlockPool(KVShape shape, int64_t max_blocks);

  const KVShape& shape() const { return shape_; }
  int64_t max_blocks() const { return max_blocks_; }
  // Room for `max_blocks` in all, never fewer: more sequences at once, while the caches drawing
  // from the pool keep their blocks (new ones take memory only once used).
  void grow(int64_t max_blocks);
  int64_t free_blocks() const;
  int64_t block_bytes() const;  // the memory one block takes once used
  // A block with one owner. When none is free it asks the reclaimer first; throws afm::Error
  // when the pool is still exhausted.
  int32_t allocate();
  void retain(int32_t block);   // one owner more
  void release(int32_t block);  // one owner fewer
  int32_t owners(int32_t block) const { return owners_[block]; }
  // Called by allocate() when no block is free; it releases at least one block and returns true,
  // or returns false. A prefix cache gives back the blocks only it still holds.
  void set_reclaimer(std::function<bool()> reclaim) { reclaim_ = std::move(reclaim); }
  uint8_t* keys(int32_t block, int64_t layer);    // [kv_head][head_dim][slot] elements of shape().type
  uint8_t* values(int32_t block, int64_t layer);  // [kv_head][slot][head_dim]

 private:
  struct FreeBytes {
    void operator()(uint8_t* p) const;
  };
  KVShape shape_;
  int64_t max_blocks_;
  int64_t bytes_per_layer_;  // K + V of one layer in one block
  std::vector<std::unique_ptr<uint8_t, FreeBytes>> blocks_;  // allocated on first use
  std::vector<int32_t> owners_;
  std::vector<int32_t> free_list_;
  std::function<bool()> reclaim_;
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
  // Forget positions from `length` on, returning whole blocks past it to the pool. A shared block
  // that would be written again (the new last one, partly kept) is first copied, so other owners
  // keep their contents.
  void truncate(int64_t length);

  // The physical blocks holding positions 0, block_size, 2 * block_size, ... in order.
  std::span<const int32_t> blocks() const { return block_table_; }
  // Starts this empty cache from full blocks another sequence wrote (positions
  // [0, blocks.size() * block_size)), as one more owner of each.
  void share_prefix(std::span<const int32_t> blocks);
  // A cache holding the same positions: full blocks are shared, the partial last one is copied.
  std::unique_ptr<KVCache> fork() const;

  // One position's key and value rows of head_dim f32s for (layer, kv_head): written rounded to
  // the cache's type, read back widened to f32. The position must be reserved.
  void write(int64_t layer, int64_t kv_head, int64_t pos, const float* key, const float* value);
  void read_key(int64_t layer, int64_t kv_head, int64_t pos, float* key) const;
  void read_value(int64_t layer, int64_t kv_head, int64_t pos, float* value) const;

  // The raw rows of logical block `block` (positions block * block_size ...) for the kernels:
  // keys transposed, element (d, slot) at d * block_size + slot; values (slot, d) at
  // slot * head_dim + d; elements of shape().type.
  const uint8_t* key_block(int64_t layer, int64_t kv_head, int64_t block) const {
    return keys_of(layer, kv_head, block);
  }
  const uint8_t* value_block(int64_t layer, int64_t kv_head, int64_t block) const {
    return values_of(layer, kv_head, block);
  }

 private:
  uint8_t* keys_of(int64_t layer, int64_t kv_head, int64_t block) const;
  uint8_t* values_of(int64_t layer, int64_t kv_head, int64_t block) const;
  void make_last_block_private();
  std::shared_ptr<BlockPool> pool_;
  int64_t max_positions_;
  int64_t length_ = 0;
  std::vector<int32_t> block_table_;
};

}  // namespace afm
