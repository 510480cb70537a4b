#include "prefix_cache.h"

#include <algorithm>

namespace afm {

namespace {

// The key of a block: its tokens mixed into the parent's key (splitmix64 steps). Never 0, which
// stands for "no parent".
uint64_t block_key(uint64_t parent, std::span<const int32_t> tokens) {
  uint64_t h = parent ^ 0x9e3779b97f4a7c15ull;
  for (int32_t t : tokens) {
    h ^= uint32_t(t);
    h += 0x9e3779b97f4a7c15ull;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
  }
  return h == 0 ? 1 : h;
}

}  // namespace

PrefixCache::PrefixCache(std::shared_ptr<BlockPool> pool) : pool_(std::move(pool)) {
  pool_->set_reclaimer([this] { return evict_one(); });
}

PrefixCache::~PrefixCache() {
  pool_->set_reclaimer(nullptr);
  for (auto& [key, entry] : entries_) pool_->release(entry.block);
}

const PrefixCache::Entry* PrefixCache::find(uint64_t key, uint64_t parent, std::span<const int32_t> tokens) const {
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second.parent != parent ||
      !std::equal(tokens.begin(), tokens.end(), it->second.tokens.begin(), it->second.tokens.end()))
    return nullptr;
  return &it->second;
}

std::vector<uint64_t> PrefixCache::longest_prefix(std::span<const int32_t> tokens, int64_t max_length, uint64_t use) const {
  const int64_t block_size = pool_->shape().block_size;
  std::vector<uint64_t> keys;
  uint64_t parent = 0;
  for (int64_t end = block_size; end <= std::min<int64_t>(max_length, int64_t(tokens.size())); end += block_size) {
    const auto block_tokens = tokens.subspan(end - block_size, block_size);
    const uint64_t key = block_key(parent, block_tokens);
    if (!find(key, parent, block_tokens)) break;
    if (use) entries_.at(key).last_use = use;
    keys.push_back(key);
    parent = key;
  }
  return keys;
}

int64_t PrefixCache::attach(std::span<const int32_t> tokens, int64_t max_length, KVCache& cache) {
  queries_++;
  const std::vector<uint64_t> keys = longest_prefix(tokens, max_length, ++clock_);
  if (keys.empty()) return 0;
  hits_++;
  std::vector<int32_t> shared;
  for (uint64_t key : keys) shared.push_back(entries_.at(key).block);
  cache.share_prefix(shared);
  return cache.length();
}

void PrefixCache::insert(std::span<const int32_t> tokens, const KVCache& cache) {
  const int64_t block_size = cache.shape().block_size;
  const int64_t full = std::min<int64_t>(int64_t(tokens.size()), cache.length()) / block_size;
  clock_++;
  uint64_t parent = 0;
  for (int64_t i = 0; i < full; i++) {
    const auto block_tokens = tokens.subspan(i * block_size, block_size);
    const uint64_t key = block_key(parent, block_tokens);
    auto it = entries_.find(key);
    if (it == entries_.end()) {
      const int32_t block = cache.blocks()[i];
      pool_->retain(block);
      entries_.emplace(key, Entry{block, parent, {block_tokens.begin(), block_tokens.end()}, clock_, i});
    } else if (it->second.parent == parent &&
               std::equal(block_tokens.begin(), block_tokens.end(), it->second.tokens.begin())) {
      it->second.last_use = clock_;
    } else {
      break;  // a hash collision: keep the recorded block, record nothing after it
    }
    parent = key;
  }
}

int64_t PrefixCache::evictable_blocks() const {
  return std::count_if(entries_.begin(), entries_.end(), [&](const auto& e) { return pool_->owners(e.second.block) == 1; });
}

bool PrefixCache::evict_one() {
  // Least recently used first; within one use, the deepest block, so a chain is cut from its end
  // and its earlier blocks stay reachable.
  auto victim = entries_.end();
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (pool_->owners(it->second.block) != 1) continue;  // a sequence still reads it
    if (victim == entries_.end() || it->second.last_use < victim->second.last_use ||
        (it->second.last_use == victim->second.last_use && it->second.depth > victim->second.depth))
      victim = it;
  }
  if (victim == entries_.end()) return false;
  pool_->release(victim->second.block);
  entries_.erase(victim);
  return true;
}

}  // namespace afm
