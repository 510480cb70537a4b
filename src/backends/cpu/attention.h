// The CPU backend's KV cache writes and causal GQA attention over the paged cache (backend.h
// states the contracts).
#pragma once
#include <cstdint>
#include <span>

#include "backend.h"
#include "backends/cpu/dot.h"
#include "backends/cpu/thread_pool.h"

namespace afm::cpu {

// Rounds k and v rows to the cache's element type and stores them at their positions.
void cache_update(KVCache& cache, int64_t layer, const Tensor& k, const Tensor& v, std::span<const int32_t> positions);

// out = softmax(q k^T / sqrt(head_dim)) v per query head, each row over the cached positions up
// to its own, with the online softmax (a running max and sum per row, f32 throughout): prefill in
// tiles of query tokens against each block of keys, decode block by block, split across threads
// when there are few kv heads (flash-decoding). `isa` picks the kernels (tests run each one; ISAs
// wider than Avx512 use its kernels); throws afm::Error for one this CPU lacks.
void attention(const Tensor& q, const KVCache& cache, int64_t layer, std::span<const int32_t> positions, Tensor& out,
               ThreadPool& pool, Isa isa = best_isa());

}  // namespace afm::cpu
