#include "kv_cache.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "error.h"
#include "numeric.h"

namespace afm {

const char* kv_cache_type_name(KVCacheType type) {
  switch (type) {
    case KVCacheType::F32: return "f32";
    case KVCacheType::F16: return "f16";
    case KVCacheType::BF16: return "bf16";
  }
  return "?";
}

KVCacheType parse_kv_cache_type(const std::string& name) {
  for (KVCacheType t : {KVCacheType::F32, KVCacheType::F16, KVCacheType::BF16})
    if (name == kv_cache_type_name(t)) return t;
  throw Error("unknown KV cache type \"" + name + "\" (choose f32, f16 or bf16)");
}

int64_t kv_element_bytes(KVCacheType type) { return type == KVCacheType::F32 ? 4 : 2; }

namespace {

void store_row(KVCacheType type, const float* src, int64_t n, int64_t stride, uint8_t* dst) {
  for (int64_t i = 0; i < n; i++) {
    uint8_t* p = dst + i * stride * kv_element_bytes(type);
    switch (type) {
      case KVCacheType::F32: std::memcpy(p, &src[i], 4); break;
      case KVCacheType::F16: {
        const uint16_t h = f32_to_f16(src[i]);
        std::memcpy(p, &h, 2);
        break;
      }
      case KVCacheType::BF16: {
        const uint16_t h = f32_to_bf16(src[i]);
        std::memcpy(p, &h, 2);
        break;
      }
    }
  }
}

void load_row(KVCacheType type, const uint8_t* src, int64_t n, int64_t stride, float* dst) {
  for (int64_t i = 0; i < n; i++) {
    const uint8_t* p = src + i * stride * kv_element_bytes(type);
    uint16_t h;
    switch (type) {
      case KVCacheType::F32: std::memcpy(&dst[i], p, 4); break;
      case KVCacheType::F16: std::memcpy(&h, p, 2), dst[i] = f16_to_f32(h); break;
      case KVCacheType::BF16: std::memcpy(&h, p, 2), dst[i] = bf16_to_f32(h); break;
    }
  }
}

constexpr int64_t kAlign = 64;

}  // namespace

void BlockPool::FreeBytes::operator()(uint8_t* p) const { std::free(p); }

BlockPool::BlockPool(KVShape shape, int64_t max_blocks)
    : shape_(shape),
      max_blocks_(max_blocks),
      bytes_per_layer_(2 * shape.num_kv_heads * shape.block_size * shape.head_dim * shape.element_bytes()) {
  blocks_.resize(max_blocks);
  owners_.assign(max_blocks, 0);
  free_list_.reserve(max_blocks);
  for (int64_t b = max_blocks - 1; b >= 0; b--) free_list_.push_back(int32_t(b));
}

void BlockPool::grow(int64_t max_blocks) {
  if (max_blocks > INT32_MAX) throw Error("a KV pool holds at most 2^31 - 1 blocks");
  if (max_blocks <= max_blocks_) return;
  blocks_.resize(max_blocks);
  owners_.resize(max_blocks, 0);
  // New blocks go under the free list, so the ones already free are still handed out first.
  std::vector<int32_t> added;
  for (int64_t b = max_blocks - 1; b >= max_blocks_; b--) added.push_back(int32_t(b));
  free_list_.insert(free_list_.begin(), added.begin(), added.end());
  max_blocks_ = max_blocks;
}

int64_t BlockPool::free_blocks() const { return int64_t(free_list_.size()); }

int64_t BlockPool::block_bytes() const {
  // Rounded up to the alignment, plus the padding that kernels' whole-vector loads may touch.
  return (bytes_per_layer_ * shape_.num_layers + 2 * kAlign - 1) / kAlign * kAlign;
}

int32_t BlockPool::allocate() {
  while (free_list_.empty() && reclaim_ && reclaim_()) {
  }
  if (free_list_.empty())
    throw Error("KV cache is full: all " + std::to_string(max_blocks_) + " blocks of " +
                std::to_string(shape_.block_size) + " tokens are in use");
  int32_t block = free_list_.back();
  free_list_.pop_back();
  owners_[block] = 1;
  if (!blocks_[block]) {
    // Zeroed so the padding lanes hold finite numbers.
    const int64_t bytes = block_bytes();
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(kAlign, size_t(bytes)));
    if (!p) throw Error("out of memory for a KV cache block of " + std::to_string(bytes) + " bytes");
    std::memset(p, 0, size_t(bytes));
    blocks_[block].reset(p);
  }
  return block;
}

void BlockPool::retain(int32_t block) { owners_[block]++; }

void BlockPool::release(int32_t block) {
  if (--owners_[block] == 0) free_list_.push_back(block);
}

uint8_t* BlockPool::keys(int32_t block, int64_t layer) { return blocks_[block].get() + layer * bytes_per_layer_; }

uint8_t* BlockPool::values(int32_t block, int64_t layer) { return keys(block, layer) + bytes_per_layer_ / 2; }

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
  make_last_block_private();
}

void KVCache::make_last_block_private() {
  if (block_table_.empty() || length_ % shape().block_size == 0) return;
  const int32_t shared = block_table_.back();
  if (pool_->owners(shared) == 1) return;
  const int32_t own = pool_->allocate();
  std::memcpy(pool_->keys(own, 0), pool_->keys(shared, 0), size_t(pool_->block_bytes()));
  pool_->release(shared);
  block_table_.back() = own;
}

void KVCache::share_prefix(std::span<const int32_t> blocks) {
  if (!block_table_.empty()) throw Error("KVCache::share_prefix: the cache is not empty");
  const int64_t length = int64_t(blocks.size()) * shape().block_size;
  if (length > max_positions_) throw Error("KVCache::share_prefix: the prefix exceeds the context limit");
  for (int32_t b : blocks) pool_->retain(b);
  block_table_.assign(blocks.begin(), blocks.end());
  length_ = length;
}

std::unique_ptr<KVCache> KVCache::fork() const {
  auto copy = std::make_unique<KVCache>(pool_, max_positions_);
  // Only the blocks holding positions: ones reserved past the length stay this cache's own.
  const int64_t used = (length_ + shape().block_size - 1) / shape().block_size;
  copy->block_table_.assign(block_table_.begin(), block_table_.begin() + used);
  for (int32_t b : copy->block_table_) pool_->retain(b);
  copy->length_ = length_;
  copy->make_last_block_private();
  return copy;
}

void KVCache::reserve(int64_t end) {
  if (end > max_positions_)
    throw Error("sequence of " + std::to_string(end) + " tokens exceeds the context limit of " +
                std::to_string(max_positions_) + " (raise --max-seq-len or shorten the prompt)");
  const int64_t block_size = shape().block_size;
  while (int64_t(block_table_.size()) * block_size < end) block_table_.push_back(pool_->allocate());
}

uint8_t* KVCache::keys_of(int64_t layer, int64_t kv_head, int64_t block) const {
  const KVShape& s = shape();
  return pool_->keys(block_table_[block], layer) + kv_head * s.head_dim * s.block_size * s.element_bytes();
}

uint8_t* KVCache::values_of(int64_t layer, int64_t kv_head, int64_t block) const {
  const KVShape& s = shape();
  return pool_->values(block_table_[block], layer) + kv_head * s.block_size * s.head_dim * s.element_bytes();
}

void KVCache::write(int64_t layer, int64_t kv_head, int64_t pos, const float* key, const float* value) {
  const KVShape& s = shape();
  const int64_t block = pos / s.block_size, slot = pos % s.block_size, e = s.element_bytes();
  uint8_t* keys = keys_of(layer, kv_head, block) + slot * e;
  uint8_t* values = values_of(layer, kv_head, block) + slot * s.head_dim * e;
  store_row(s.type, key, s.head_dim, s.block_size, keys);  // one column of the transposed keys
  store_row(s.type, value, s.head_dim, 1, values);
}

void KVCache::read_key(int64_t layer, int64_t kv_head, int64_t pos, float* key) const {
  const KVShape& s = shape();
  const uint8_t* keys = key_block(layer, kv_head, pos / s.block_size) + pos % s.block_size * s.element_bytes();
  load_row(s.type, keys, s.head_dim, s.block_size, key);
}

void KVCache::read_value(int64_t layer, int64_t kv_head, int64_t pos, float* value) const {
  const KVShape& s = shape();
  const uint8_t* values =
      value_block(layer, kv_head, pos / s.block_size) + pos % s.block_size * s.head_dim * s.element_bytes();
  load_row(s.type, values, s.head_dim, 1, value);
}

}  // namespace afm
