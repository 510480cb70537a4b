// The CPU backend's KV cache writes and causal GQA attention over the paged cache (backend.h
// states the contracts).
#pragma once
#include <cstdint>
#include <span>

#include "backend.h"
#include "backends/cpu/thread_pool.h"

namespace afm::cpu {

void cache_update(KVCache& cache, int64_t layer, const Tensor& k, const Tensor& v, std::span<const int32_t> positions);

void attention(const Tensor& q, KVCache& cache, int64_t layer, std::span<const int32_t> positions, Tensor& out,
               ThreadPool& pool);

}  // namespace afm::cpu
