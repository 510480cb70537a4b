// Matrix-vector products through the dot kernels, single thread, on AFM-4.5B's MLP shapes:
// gate/up W [18432, 2560] and down W [2560, 18432]. "GB/s" counts weight bytes streamed, to
// compare with ReadBandwidth, a plain AVX2 read of the same number of bytes (what memory gives).
// A third shape, [64, 2560], stays in L2 and shows what the kernel could do if memory kept up.
// Args: format (WeightFormat), isa (afm::cpu::Isa: 0 scalar, 1 avx2, 2 avx512, 3 avx512vnni), n_x (activation rows),
// shape (0 up, 1 down, 2 in-cache). Times are CPU time: the build machine is shared. An ISA the
// CPU lacks reports an error row instead of a time.
#include <benchmark/benchmark.h>

#include <immintrin.h>

#include <cstring>
#include <random>
#include <vector>

#include "backends/cpu/dot.h"
#include "backends/cpu/int8_dot.h"
#include "blockfloat.h"

using afm::WeightFormat;

namespace {

constexpr int64_t kHidden = 2560, kIntermediate = 18432;

struct Matrix {
  int64_t rows, cols, row_bytes;
  std::vector<uint8_t> data;
};

Matrix make_matrix(WeightFormat f, int64_t rows, int64_t cols) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> src(cols);
  Matrix m{rows, cols, 0, {}};
  m.row_bytes = f == WeightFormat::F32 ? 4 * cols
                : f == WeightFormat::F16 || f == WeightFormat::BF16 ? 2 * cols
                : afm::block_float_row_bytes(f, cols);
  m.data.resize(rows * m.row_bytes);
  for (float& v : src) v = normal(rng);
  for (int64_t r = 0; r < rows; r++) {
    uint8_t* dst = m.data.data() + r * m.row_bytes;
    src[r % cols] = normal(rng);  // rows differ a little; contents do not matter for speed
    if (afm::is_block_float(f)) {
      afm::block_float_quantize_row(f, src.data(), cols, dst);
    } else if (f == WeightFormat::F32) {
      std::memcpy(dst, src.data(), m.row_bytes);
    } else {  // f16 / bf16 bit patterns; any finite values will do
      for (int64_t i = 0; i < cols; i++) {
        const uint16_t h = f == WeightFormat::BF16 ? uint16_t(std::bit_cast<uint32_t>(src[i]) >> 16)
                                                   : uint16_t(0x2000 + (i * 37 + r) % 0x3000);
        std::memcpy(dst + 2 * i, &h, 2);
      }
    }
  }
  return m;
}

// One benchmark case: its arguments, the matrix, and x (n_x rows of 0.5).
struct Case {
  WeightFormat format;
  afm::cpu::Isa isa;
  int n_x, shape;
  Matrix w;
  std::vector<float> x;
};

// Reads the arguments and builds the case; false (the row reports an error) for an absent ISA.
bool make_case(benchmark::State& state, Case& c) {
  c.format = WeightFormat(state.range(0));
  c.isa = afm::cpu::Isa(state.range(1));
  c.n_x = int(state.range(2));
  c.shape = int(state.range(3));
  if (!afm::cpu::isa_supported(c.isa)) {
    state.SkipWithError("ISA not supported on this CPU");
    return false;
  }
  const int64_t rows[] = {kIntermediate, kHidden, 64}, cols[] = {kHidden, kIntermediate, kHidden};
  c.w = make_matrix(c.format, rows[c.shape], cols[c.shape]);
  c.x.assign(c.n_x * c.w.cols, 0.5f);
  return true;
}

// Times dot_row(weight row, results) over every row of the matrix, and reports weight GB/s.
template <class DotRow>
void time_rows(benchmark::State& state, const Case& c, const DotRow& dot_row) {
  const Matrix& w = c.w;
  std::vector<float> out(c.n_x * w.rows);
  for (auto _ : state) {
    for (int64_t r = 0; r < w.rows; r++) {
      float o[afm::cpu::kMaxDotRows];
      dot_row(w.data.data() + r * w.row_bytes, o);
      for (int j = 0; j < c.n_x; j++) out[j * w.rows + r] = o[j];
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(double(w.data.size()) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2e-9 * double(w.rows * w.cols * c.n_x), benchmark::Counter::kIsIterationInvariantRate);
  const char* shape_names[] = {" up", " down", " in-cache"};
  state.SetLabel(std::string(afm::cpu::isa_name(c.isa)) + shape_names[c.shape]);
}

void Dot(benchmark::State& state) {
  Case c;
  if (!make_case(state, c)) return;
  const afm::cpu::DotFn dot = afm::cpu::dot_kernel(c.format, c.isa);
  time_rows(state, c, [&](const uint8_t* w_row, float* o) { dot(w_row, c.x.data(), c.w.cols, c.n_x, c.w.cols, o); });
}

// The same through the int8 activation kernels (int8_dot.h), block-float formats only; the
// activation rows are quantized once outside the timed loop, as linear does once per matmul.
void Int8Dot(benchmark::State& state) {
  Case c;
  if (!make_case(state, c)) return;
  afm::cpu::Int8Rows q;
  afm::cpu::quantize_int8_rows(c.format, c.x.data(), c.n_x, c.w.cols, q);
  const afm::cpu::Int8DotFn dot = afm::cpu::int8_dot_kernel(c.format, c.isa);
  time_rows(state, c, [&](const uint8_t* w_row, float* o) { dot(w_row, q, 0, c.n_x, o); });
}

void Int8Args(benchmark::internal::Benchmark* b) {
  for (int f : {int(WeightFormat::BFP8), int(WeightFormat::BFP4)}) {
    for (int isa : {1, 3}) {
      b->Args({f, isa, 1, 0});
      b->Args({f, isa, 1, 1});
      b->Args({f, isa, 1, 2});
    }
  }
}

// Reads a 189 MB buffer (the f32 matrix's size) with AVX2 loads: single-thread read bandwidth.
__attribute__((target("avx2"))) float read_all(const float* p, int64_t n) {
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  for (int64_t i = 0; i < n; i += 32) {
    a = _mm256_add_ps(a, _mm256_loadu_ps(p + i));
    b = _mm256_add_ps(b, _mm256_loadu_ps(p + i + 8));
    c = _mm256_add_ps(c, _mm256_loadu_ps(p + i + 16));
    d = _mm256_add_ps(d, _mm256_loadu_ps(p + i + 24));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  return lanes[0] + lanes[7];
}

void ReadBandwidth(benchmark::State& state) {
  if (!afm::cpu::isa_supported(afm::cpu::Isa::Avx2)) {
    state.SkipWithError("needs AVX2");
    return;
  }
  std::vector<float> buffer(kHidden * kIntermediate, 1.0f);
  for (auto _ : state) benchmark::DoNotOptimize(read_all(buffer.data(), int64_t(buffer.size())));
  state.counters["GB/s"] =
      benchmark::Counter(4e-9 * double(buffer.size()), benchmark::Counter::kIsIterationInvariantRate);
}

void Args(benchmark::internal::Benchmark* b) {
  for (int f = 0; f <= int(WeightFormat::BFP4); f++) {
    b->Args({f, 0, 1, 0});  // scalar fallback, decode, gate/up shape
    for (int isa : {1, 2}) {
      b->Args({f, isa, 1, 0});  // decode, gate/up shape
      b->Args({f, isa, 1, 1});  // decode, down shape
      b->Args({f, isa, 4, 0});  // prefill, 4 tokens per pass
      b->Args({f, isa, 1, 2});  // decode, compute ceiling
    }
  }
}

}  // namespace

BENCHMARK(ReadBandwidth)->Unit(benchmark::kMillisecond);
BENCHMARK(Int8Dot)->Apply(Int8Args)->ArgNames({"fmt", "isa", "n_x", "shape"})->Unit(benchmark::kMillisecond);
BENCHMARK(Dot)->Apply(Args)->ArgNames({"fmt", "isa", "n_x", "shape"})->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
