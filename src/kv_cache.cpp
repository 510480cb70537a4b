#include "kv_cache.h"

#include <algorithm>
#include <string>

#include "error.h"

namespace afm {

BlockPool::BlockPool(KVShape shape, int64_t max_blocks)
    : shape_(shape),
      max_blocks_(max_blocks),
      floats_per_layer_(2 * shape.num_kv_heads * shape.block_size * shape.head_dim),
      blocks_(max_blocks) {
  free_list_.reserve(max_blocks);
  for (int64_t b = max_blocks - 1; b >= 0; b--) free_list_.push_back(int32_t(b));
}

int64_t BlockPool::free_blocks() const { return int64_t(free_list_.size()); }

int32_t BlockPool::allocate() {
  if (free_list_.empty())
    throw Error("KV cache is full: all " + std::to_string(max_blocks_) + " blocks of " +
                std::to_string(shape_.block_size) + " tokens are in use");
  int32_t block = free_list_.back();
  free_list_.pop_back();
  if (!blocks_[block]) blocks_[block].reset(new float[floats_per_layer_ * shape_.num_layers]);
  return block;
}

void BlockPool::release(int32_t block) { free_list_.push_back(block); }

float* BlockPool::keys(int32_t block, int64_t layer) { return blocks_[block].get() + layer * floats_per_layer_; }

float* BlockPool::values(int32_t block, int64_t layer) {
  return keys(block, layer) + floats_per_layer_ / 2;
}

KVCache::KVCache(std::shared_ptr<BlockPool> pool, int64_t max_positions)
    : pool_(std::move(pool)), max_positions_(max_positions) {}

KVCache::~KVCache() { clear(); }

void KVCache::clear() { truncate(0); }

void KVCache::truncate(int64_t length) {
  const int64_t blocks_needed = (length + shape().block_size - 1) / shape().block_size;
  while (int64_t(block_table_.size()) > blocks_needed) {
    pool_->release(block_table_.back());
    block_table_.pop_back();
  }
  length_ = std::min(length_, length);
}

void KVCache::reserve(int64_t end) {
  if (end > max_positions_)
    throw Error("sequence of " + std::to_string(end) + " tokens exceeds the context limit of " +
                std::to_string(max_positions_) + " (raise --max-seq-len or shorten the prompt)");
  const int64_t block_size = shape().block_size;
  while (int64_t(block_table_.size()) * block_size < end) block_table_.push_back(pool_->allocate());
}

float* KVCache::key(int64_t layer, int64_t kv_head, int64_t pos) {
  const KVShape& s = shape();
  float* block = pool_->keys(block_table_[pos / s.block_size], layer);
  return block + (kv_head * s.block_size + pos % s.block_size) * s.head_dim;
}

float* KVCache::value(int64_t layer, int64_t kv_head, int64_t pos) {
  const KVShape& s = shape();
  float* block = pool_->values(block_table_[pos / s.block_size], layer);
  return block + (kv_head * s.block_size + pos % s.block_size) * s.head_dim;
}

}  // namespace afm
