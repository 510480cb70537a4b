// Decode attention as AFM-4.5B runs it: one token's query (20 heads, 4 kv heads, head_dim 128)
// against a paged cache of `context` positions, over all 36 layers (so the cache is far past the
// caches at long contexts), on every core. Reported against the same run's machine: the cache
// bytes read per second against the read bandwidth (pct_of_read), and the multiply-adds of the
// scores and the weighted sum against the f32 FMA peak (pct_of_fma_peak).
// Args: cache type (afm::KVCacheType), context, isa (afm::cpu::Isa).
#include <benchmark/benchmark.h>

#include <chrono>
#include <memory>
#include <random>
#include <vector>

#include "backend.h"
#include "backends/cpu/attention.h"
#include "backends/cpu/machine.h"
#include "kv_cache.h"

namespace {

using afm::KVCacheType;
using afm::cpu::Isa;

constexpr int64_t kLayers = 36, kHeads = 20, kKvHeads = 4, kHeadDim = 128;

void DecodeAttention(benchmark::State& state) {
  const auto type = KVCacheType(state.range(0));
  const int64_t context = state.range(1);
  const auto isa = Isa(state.range(2));
  if (!afm::cpu::isa_supported(isa)) {
    state.SkipWithError((std::string(afm::cpu::isa_name(isa)) + " is not supported on this CPU").c_str());
    return;
  }
  static afm::cpu::ThreadPool pool(0);
  const afm::KVShape shape{kLayers, kKvHeads, kHeadDim, 16, type};
  auto blocks = std::make_shared<afm::BlockPool>(shape, (context + shape.block_size) / shape.block_size);
  afm::KVCache cache(blocks, context + 1);
  cache.reserve(context + 1);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> k(kHeadDim), v(kHeadDim);
  for (int64_t layer = 0; layer < kLayers; layer++)
    for (int64_t h = 0; h < kKvHeads; h++)
      for (int64_t p = 0; p <= context; p++) {
        for (int64_t d = 0; d < kHeadDim; d++) k[d] = normal(rng), v[d] = normal(rng);
        cache.write(layer, h, p, k.data(), v.data());
      }
  cache.set_length(context + 1);

  afm::Tensor q, out;
  std::vector<float> storage(2 * kHeads * kHeadDim);  // q, then out
  for (float& x : storage) x = normal(rng);
  q.data = storage.data(), q.rows = 1, q.cols = kHeads * kHeadDim;
  out.data = storage.data() + kHeads * kHeadDim, out.rows = 1, out.cols = kHeads * kHeadDim;
  const int32_t position[] = {int32_t(context)};

  double seconds = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t layer = 0; layer < kLayers; layer++) afm::cpu::attention(q, cache, layer, position, out, pool, isa);
    const double call = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    state.SetIterationTime(call);
    seconds += call;
    benchmark::DoNotOptimize(out.data);
  }
  const double per_token = seconds / double(state.iterations());
  const double bytes = double(shape.bytes_per_position()) * double(context + 1);
  const double flops = 2.0 * 2.0 * double(kLayers * kHeads * kHeadDim) * double(context + 1);
  const double read = afm::cpu::read_bandwidth_GBps(pool, int64_t(1) << 30);
  const double peak = afm::cpu::f32_fma_peak(pool).all_threads;
  state.counters["GB/s"] = bytes / per_token * 1e-9;
  state.counters["pct_of_read"] = 100 * bytes / per_token * 1e-9 / read;
  state.counters["GFLOP/s"] = flops / per_token * 1e-9;
  state.counters["pct_of_fma_peak"] = 100 * flops / per_token * 1e-9 / peak;
  state.SetLabel(std::string(afm::kv_cache_type_name(type)) + " cache, " + afm::cpu::isa_name(isa) + ", " +
                 std::to_string(pool.size()) + " threads");
}

void Args(benchmark::internal::Benchmark* b) {
  for (int type : {int(KVCacheType::F16), int(KVCacheType::BF16), int(KVCacheType::F32)})
    for (int context : {512, 4096})
      for (int isa : {int(Isa::Avx2), int(Isa::Avx512)}) b->Args({type, context, isa});
}

}  // namespace

BENCHMARK(DecodeAttention)->Apply(Args)->ArgNames({"kv", "ctx", "isa"})->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
