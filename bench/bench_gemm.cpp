// The prefill matmuls on one thread, on AFM-4.5B's MLP shapes (up [18432, 2560], down
// [2560, 18432]) cut to 1/8 of their rows: the f32 GEMM (gemm.h) against the f32 FMA peak of one
// thread measured in the same run (peak_GFLOP/s), and the int8 GEMM (int8_gemm.h, AVX-512 VNNI)
// against the int8 dot peak (peak_GOP/s; an op is a multiply or an add, as for FLOPs); and
// decode's matvec over packed int8 panels on every core, against the read bandwidth.
// Args: format (WeightFormat), isa (afm::cpu::Isa), tokens, shape (0 up, 1 down).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstring>
#include <random>
#include <vector>

#include "backends/cpu/gemm.h"
#include "backends/cpu/int8_gemm.h"
#include "backends/cpu/machine.h"
#include "blockfloat.h"
#include "numeric.h"

using afm::WeightFormat;
using afm::cpu::Isa;

namespace {

struct Matrix {
  std::vector<uint8_t> bytes;
  afm::Weight weight;
};

Matrix make_matrix(WeightFormat f, int64_t rows, int64_t cols) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> src(cols);
  Matrix m;
  auto& w = m.weight;
  w.format = f;
  w.rows = rows;
  w.cols = cols;
  w.row_bytes = f == WeightFormat::F32 ? 4 * cols : f == WeightFormat::BF16 ? 2 * cols : afm::block_float_row_bytes(f, cols);
  w.inputs = f == WeightFormat::F32 ? afm::MatmulInputs::F32 : afm::MatmulInputs::BF16;
  m.bytes.resize(rows * w.row_bytes);
  for (int64_t r = 0; r < rows; r++) {
    for (float& v : src) v = normal(rng);
    uint8_t* dst = m.bytes.data() + r * w.row_bytes;
    if (afm::is_block_float(f)) {
      afm::block_float_quantize_row(f, src.data(), cols, dst);
    } else if (f == WeightFormat::F32) {
      std::memcpy(dst, src.data(), w.row_bytes);
    } else {
      for (int64_t i = 0; i < cols; i++) {
        const uint16_t h = afm::f32_to_bf16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
    }
  }
  w.data = m.bytes.data();
  return m;
}

afm::cpu::ThreadPool& one_thread() {
  static afm::cpu::ThreadPool pool(1);
  return pool;
}

void Gemm(benchmark::State& state) {
  const auto format = WeightFormat(state.range(0));
  const auto isa = Isa(state.range(1));
  const int64_t tokens = state.range(2);
  const int shape = int(state.range(3));
  if (!afm::cpu::gemm_supported(isa)) {
    state.SkipWithError("no gemm kernels for this ISA on this CPU");
    return;
  }
  const int64_t rows[] = {18432 / 8, 2560 / 8}, cols[] = {2560, 18432};
  const Matrix m = make_matrix(format, rows[shape], cols[shape]);
  std::vector<float> x(tokens * cols[shape]), out(tokens * rows[shape]);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& v : x) v = afm::round_to_bf16(normal(rng));
  for (auto _ : state) {
    afm::cpu::gemm(m.weight, x.data(), tokens, out.data(), one_thread(), isa);
    benchmark::DoNotOptimize(out.data());
  }
  const double flops = 2.0 * double(tokens * rows[shape] * cols[shape]);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  static const double peak = afm::cpu::f32_fma_peak(one_thread()).per_thread;
  state.counters["peak_GFLOP/s"] = peak;
  state.SetLabel(std::string(afm::cpu::isa_name(isa)) + (shape == 0 ? " up" : " down"));
}

// The int8 GEMM on activations quantized outside the timed loop (quantize_int8_rows, timed by
// Int8Quantize).
void Int8Gemm(benchmark::State& state) {
  const auto format = WeightFormat(state.range(0));
  const int64_t tokens = state.range(1);
  const int shape = int(state.range(2));
  if (!afm::cpu::int8_gemm_supported(afm::cpu::best_isa())) {
    state.SkipWithError("no int8 gemm kernels on this CPU (needs AVX-512 VNNI)");
    return;
  }
  const int64_t rows[] = {18432 / 8, 2560 / 8}, cols[] = {2560, 18432};
  Matrix m = make_matrix(format, rows[shape], cols[shape]);
  m.weight.inputs = afm::MatmulInputs::Int8;
  std::vector<float> x(tokens * cols[shape]), out(tokens * rows[shape]);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  afm::cpu::Int8Rows q;
  afm::cpu::quantize_int8_rows(format, x.data(), tokens, cols[shape], q);
  for (auto _ : state) {
    afm::cpu::int8_gemm(m.weight, q, out.data(), one_thread());
    benchmark::DoNotOptimize(out.data());
  }
  const double ops = 2.0 * double(tokens * rows[shape] * cols[shape]);
  state.counters["GOP/s"] = benchmark::Counter(ops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  static const double peak = afm::cpu::int8_dot_peak(one_thread()).per_thread;
  state.counters["peak_GOP/s"] = peak;
  state.SetLabel(shape == 0 ? "up" : "down");
}

// The int8 GEMM as the model runs a prefill or batch by default: int16 activations on weights packed
// at load, in either layout (0: halves, 1: values), against half the int8 dot peak (two int8 dot
// products per multiply-add, or one `vpdpwssd` per 32). Where the two layouts cross is
// int16_layout_for's threshold.
void Int16Gemm(benchmark::State& state) {
  const auto format = WeightFormat(state.range(0));
  const int64_t tokens = state.range(1);
  const int shape = int(state.range(2));
  const auto layout = state.range(3) ? afm::cpu::Int16Layout::Values : afm::cpu::Int16Layout::Halves;
  if (!afm::cpu::int8_gemm_supported(afm::cpu::best_isa())) {
    state.SkipWithError("no int8 gemm kernels on this CPU (needs AVX-512 VNNI)");
    return;
  }
  const int64_t rows[] = {18432 / 8, 2560 / 8}, cols[] = {2560, 18432};
  Matrix m = make_matrix(format, rows[shape], cols[shape]);
  m.weight.inputs = afm::MatmulInputs::Int16;
  const afm::Weight packed = afm::cpu::int8_panels(m.weight);
  std::vector<float> x(tokens * cols[shape]), out(tokens * rows[shape]);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  afm::cpu::Int8Rows q;
  afm::cpu::quantize_int16_rows(format, x.data(), tokens, cols[shape], q, nullptr, layout);
  for (auto _ : state) {
    afm::cpu::int8_gemm(packed, q, out.data(), one_thread());
    benchmark::DoNotOptimize(out.data());
  }
  const double ops = 2.0 * double(tokens * rows[shape] * cols[shape]);
  state.counters["GOP/s"] = benchmark::Counter(ops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  static const double half_peak = afm::cpu::int8_dot_peak(one_thread()).per_thread / 2;
  state.counters["half_peak_GOP/s"] = half_peak;
  state.SetLabel(afm::format_name(format) + (shape == 0 ? " up, " : " down, ") +
                 (state.range(3) ? "values" : "halves"));
}

// Decode's matmul as the model runs it: one token through int8_panels' packed weights, on every
// core, over a matrix 3.5x the MLP's up projection (175 MB of bfp8, far past the caches), against the read
// bandwidth of the same pool measured in the same run (read_GB/s, pct_of_read). Args: format,
// int16 (1: activations as the model quantizes them by default, 0: int8).
void Int8PanelsDecode(benchmark::State& state) {
  const auto format = WeightFormat(state.range(0));
  const bool int16 = state.range(1) != 0;
  if (!afm::cpu::int8_gemm_supported(afm::cpu::best_isa())) {
    state.SkipWithError("no int8 gemm kernels on this CPU (needs AVX-512 VNNI)");
    return;
  }
  static afm::cpu::ThreadPool pool(0);
  const int64_t rows = 7 * 18432 / 2, cols = 2560;
  Matrix m = make_matrix(format, rows, cols);
  m.weight.inputs = int16 ? afm::MatmulInputs::Int16 : afm::MatmulInputs::Int8;
  const afm::Weight packed = afm::cpu::int8_panels(m.weight);
  std::vector<float> x(cols), out(rows);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  afm::cpu::Int8Rows q;
  if (int16) afm::cpu::quantize_int16_rows(format, x.data(), 1, cols, q);
  else afm::cpu::quantize_int8_rows(format, x.data(), 1, cols, q);
  double seconds = 0;  // timed here, so that the ratio to the read bandwidth can be a counter
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    afm::cpu::int8_gemm(packed, q, out.data(), pool);
    const double call = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    state.SetIterationTime(call);
    seconds += call;
    benchmark::DoNotOptimize(out.data());
  }
  const double gbps = double(packed.bytes()) * double(state.iterations()) / seconds * 1e-9;
  const double read = afm::cpu::read_bandwidth_GBps(pool, int64_t(1) << 30);
  state.counters["GB/s"] = gbps;
  state.counters["read_GB/s"] = read;
  state.counters["pct_of_read"] = 100 * gbps / read;
  state.SetLabel(afm::format_name(format) + (int16 ? ", int16, " : ", int8, ") + std::to_string(pool.size()) + " threads");
}

// quantize_int8_rows on one thread: 512 tokens of the down matrix's input.
void Int8Quantize(benchmark::State& state) {
  const int64_t tokens = 512, cols = 18432;
  std::vector<float> x(tokens * cols);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  afm::cpu::Int8Rows q;
  for (auto _ : state) afm::cpu::quantize_int8_rows(WeightFormat::BFP8, x.data(), tokens, cols, q);
  state.counters["Gvalues/s"] = benchmark::Counter(double(tokens * cols) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void Args(benchmark::internal::Benchmark* b) {
  for (int f : {int(WeightFormat::F32), int(WeightFormat::BF16), int(WeightFormat::BFP8), int(WeightFormat::BFP4)})
    for (int isa : {int(Isa::Avx2), int(Isa::Avx512)})
      for (int tokens : {16, 128, 512})
        for (int shape : {0, 1}) b->Args({f, isa, tokens, shape});
}

}  // namespace

BENCHMARK(Gemm)->Apply(Args)->ArgNames({"fmt", "isa", "tokens", "shape"})->Unit(benchmark::kMillisecond);
BENCHMARK(Int8Gemm)
    ->ArgsProduct({{int(WeightFormat::BFP8), int(WeightFormat::BFP4)}, {4, 8, 16, 128, 512}, {0, 1}})
    ->ArgNames({"fmt", "tokens", "shape"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(Int16Gemm)
    ->ArgsProduct({{int(WeightFormat::BFP8), int(WeightFormat::BFP4)}, {4, 8, 16, 32, 128, 512, 2048}, {0, 1}, {0, 1}})
    ->ArgNames({"fmt", "tokens", "shape", "values"})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(Int8PanelsDecode)
    ->ArgsProduct({{int(WeightFormat::BFP8), int(WeightFormat::BFP4)}, {0, 1}})
    ->ArgNames({"fmt", "int16"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(Int8Quantize)->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
