// The int8 GEMM (int8_gemm.h) against a double-precision product of the exact block-float
// weights with the dequantized activations (q * scale), on shapes that leave partial panels,
// token tiles, column slices and blocks, from rows and from panels packed at load; and the
// parallel quantizer against the serial one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backend.h"
#include "backends/cpu/int8_gemm.h"
#include "backends/cpu/panels.h"
#include "blockfloat.h"
#include "dtype.h"
#include "error.h"
#include "numeric.h"
#include "support/random_weights.h"

using afm::Weight;
using afm::WeightFormat;
using afm::cpu::Isa;

namespace {

using afm::test::Matrix;

std::vector<float> random_activations(int64_t rows, int64_t k, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> scale_exp(-6, 6);
  std::vector<float> x(rows * k);
  for (float& v : x) v = normal(rng) * std::ldexp(1.0f, scale_exp(rng));
  for (int64_t i = 16; i < std::min<int64_t>(32, k); i++) x[i] = 0;  // an all-zero block in row 0
  return x;
}

TEST(Int8Gemm, MatchesExactProductOnOddShapes) {
  if (!afm::cpu::int8_gemm_supported(Isa::Avx512Vnni)) GTEST_SKIP() << "CPU has no AVX-512 VNNI";
  std::mt19937 rng(11);
  afm::cpu::ThreadPool pool(2);
  struct Shape {
    int64_t tokens, rows, cols;
  };
  // Rows around the 32-row panels and 256-row blocks, tokens around the 6-token tiles, columns
  // around the 64-column groups, the 256-column slices and the 16-column blocks.
  const Shape shapes[] = {{1, 1, 1},     {16, 7, 5},     {13, 33, 17},  {6, 32, 256},  {25, 48, 257},
                          {7, 100, 513}, {40, 130, 31},  {17, 17, 600}, {5, 64, 1},    {12, 300, 2560},
                          {2, 600, 64},  {19, 31, 1000}, {33, 300, 600}};
  for (WeightFormat f : {WeightFormat::BFP8, WeightFormat::BFP4}) {
    for (const Shape& s : shapes) {
      Matrix m = afm::test::make_matrix(f, s.rows, s.cols, afm::MatmulInputs::Int8, rng);
      // Row 0's first block all zeros: exponent byte 0, the smallest weight scale.
      const int64_t blocks = afm::block_float_blocks(s.cols), payload = f == WeightFormat::BFP8 ? 16 : 8;
      m.bytes[0] = 0;
      std::fill_n(m.bytes.begin() + blocks, payload, uint8_t(0));
      std::fill_n(m.values.begin(), std::min<int64_t>(16, s.cols), 0.0);
      const std::vector<float> x = random_activations(s.tokens, s.cols, rng);
      afm::cpu::Int8Rows q;
      afm::cpu::quantize_int8_rows(f, x.data(), s.tokens, s.cols, q, &pool);
      std::vector<float> out(s.tokens * s.rows + 1, 77.0f);
      afm::cpu::int8_gemm(m.weight, q, out.data(), pool, Isa::Avx512Vnni);
      EXPECT_EQ(out.back(), 77.0f) << "wrote past the output";
      // Packed at load, the same micro-kernel calls in the same order: the same floats.
      const Weight packed = afm::cpu::int8_panels(m.weight, Isa::Avx512Vnni);
      EXPECT_EQ(packed.layout, afm::WeightLayout::Backend);
      EXPECT_EQ(packed.bytes(), s.rows * (afm::cpu::round_up(s.cols, 64) / 16 * (payload + 1)));
      std::vector<float> from_panels(out.size(), 77.0f);
      afm::cpu::int8_gemm(packed, q, from_panels.data(), pool, Isa::Avx512Vnni);
      ASSERT_EQ(from_panels, out) << afm::format_name(f) << " T=" << s.tokens << " N=" << s.rows << " K=" << s.cols;
      for (int64_t t = 0; t < s.tokens; t++)
        for (int64_t n = 0; n < s.rows; n++) {
          double ref = 0, abs_sum = 0;
          for (int64_t k = 0; k < s.cols; k++) {
            const double xk = double(q.q[t * q.padded + k]) * q.scale[t * q.padded / 16 + k / 16];
            ref += m.values[n * s.cols + k] * xk;
            abs_sum += std::fabs(m.values[n * s.cols + k] * xk);
          }
          // Block sums are exact integers; only the f32 scaling and summation round.
          const double tol = (s.cols / 16 + 4) * 0x1p-22 * abs_sum + 1e-30;
          ASSERT_NEAR(out[t * s.rows + n], ref, tol) << afm::format_name(f) << " T=" << s.tokens << " N=" << s.rows
                                                     << " K=" << s.cols << " at t=" << t << " n=" << n;
        }
    }
  }
}

// The CPU backend packs block-float weights for int8 and int16 activations as it uploads them,
// where the CPU has the int8 GEMM, and its linear then quantizes to them and takes the GEMM for
// any number of tokens; other weights stay rows, nothing reads packed weights as rows, and rows
// refuse int16 activations.
TEST(Int8Gemm, TheCpuBackendPacksBlockFloatForIntegerActivationsAtUpload) {
  if (!afm::cpu::int8_gemm_supported(afm::cpu::best_isa())) GTEST_SKIP() << "CPU has no AVX-512 VNNI";
  std::mt19937 rng(5);
  afm::cpu::ThreadPool pool(2);
  const auto backend = afm::make_backend(afm::Device::cpu(), 2);
  const int64_t rows = 70, cols = 300;
  for (WeightFormat f : {WeightFormat::BFP8, WeightFormat::BFP4}) {
    for (afm::MatmulInputs inputs : {afm::MatmulInputs::Int8, afm::MatmulInputs::Int16}) {
      const bool int16 = inputs == afm::MatmulInputs::Int16;
      const Matrix m = afm::test::make_matrix(f, rows, cols, inputs, rng);
      const Weight uploaded = backend->upload(m.weight);
      ASSERT_EQ(uploaded.layout, afm::WeightLayout::Backend);
      float row[cols];
      EXPECT_THROW(afm::dequantize_row(uploaded, 0, row), afm::Error);
      EXPECT_THROW(afm::cpu::int8_panels(uploaded), afm::Error);
      for (int64_t tokens : {1, 3, 6, 20, 40}) {  // 40: a prefill's int16 values
        const std::vector<float> x = random_activations(tokens, cols, rng);
        afm::Tensor in = backend->tensor(tokens, cols), out = backend->tensor(tokens, rows);
        std::copy(x.begin(), x.end(), in.data);
        backend->linear(in, uploaded, out);
        afm::cpu::Int8Rows q;
        if (int16) afm::cpu::quantize_int16_rows(f, x.data(), tokens, cols, q, nullptr, afm::cpu::int16_layout_for(tokens));
        else afm::cpu::quantize_int8_rows(f, x.data(), tokens, cols, q);
        std::vector<float> want(tokens * rows);
        afm::cpu::int8_gemm(int16 ? uploaded : m.weight, q, want.data(), pool);
        EXPECT_EQ(std::vector<float>(out.data, out.data + tokens * rows), want)
            << afm::format_name(f) << (int16 ? " int16, " : " int8, ") << tokens << " tokens";
        if (int16) {
          EXPECT_THROW(afm::cpu::int8_gemm(m.weight, q, want.data(), pool), afm::Error);
        }
      }
    }
  }
  for (auto [format, inputs] : {std::pair{WeightFormat::BF16, afm::MatmulInputs::BF16},
                                std::pair{WeightFormat::BFP8, afm::MatmulInputs::BF16}}) {
    const Matrix other = afm::test::make_matrix(format, rows, cols, inputs, rng);
    EXPECT_EQ(backend->upload(other.weight).layout, afm::WeightLayout::Rows) << afm::format_name(format);
  }
}

// A checkpoint tensor "w" of rows x cols elements of `dtype` at `data`.
afm::TensorView matrix_view(afm::DType dtype, int64_t rows, int64_t cols, const uint8_t* data,
                            std::shared_ptr<const void> owner = nullptr) {
  afm::TensorView view;
  view.name = "w";
  view.dtype = dtype;
  view.shape = {rows, cols};
  view.data = data;
  view.nbytes = rows * cols * (dtype == afm::DType::F32 ? 4 : 2);
  view.owner = std::move(owner);
  return view;
}

// A checkpoint matrix converted straight into panels, a panel's rows at a time, gives the bytes
// of the two-step route (convert the whole matrix to rows, then pack them), from each float
// dtype and on shapes with partial panels and blocks; a non-finite weight is an error naming its
// column; and the CPU backend takes this route for a converted matrix and the rows' for one the
// checkpoint already stores packed.
TEST(Int8Gemm, PanelsStraightFromACheckpointMatrixMatchPackedRows) {
  if (!afm::cpu::int8_gemm_supported(afm::cpu::best_isa())) GTEST_SKIP() << "CPU has no AVX-512 VNNI";
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  struct Shape {
    int64_t rows, cols;
  };
  for (const Shape& s : {Shape{1, 1}, Shape{33, 17}, Shape{70, 300}, Shape{64, 256}, Shape{100, 513}}) {
    std::vector<float> values(s.rows * s.cols);
    for (float& v : values) v = normal(rng);
    for (afm::DType dtype : {afm::DType::F32, afm::DType::BF16, afm::DType::F16}) {
      const int64_t element = dtype == afm::DType::F32 ? 4 : 2;
      auto bytes = std::make_shared<std::vector<uint8_t>>(values.size() * element);
      for (size_t i = 0; i < values.size(); i++) {
        const uint16_t h = dtype == afm::DType::BF16 ? afm::f32_to_bf16(values[i]) : afm::f32_to_f16(values[i]);
        if (dtype == afm::DType::F32) std::memcpy(bytes->data() + 4 * i, &values[i], 4);
        else std::memcpy(bytes->data() + 2 * i, &h, 2);
      }
      const afm::TensorView view = matrix_view(dtype, s.rows, s.cols, bytes->data(), bytes);
      for (WeightFormat f : {WeightFormat::BFP8, WeightFormat::BFP4}) {
        const Weight direct = afm::cpu::int8_panels(view, f, afm::MatmulInputs::Int16);
        Weight rows = afm::make_weight(view, f);
        rows.inputs = afm::MatmulInputs::Int16;
        const Weight two_step = afm::cpu::int8_panels(rows);
        ASSERT_EQ(direct.layout, afm::WeightLayout::Backend);
        EXPECT_EQ(direct.inputs, afm::MatmulInputs::Int16);
        EXPECT_EQ(direct.rows, s.rows);
        EXPECT_EQ(direct.cols, s.cols);
        ASSERT_EQ(direct.bytes(), two_step.bytes());
        EXPECT_EQ(std::memcmp(direct.data, two_step.data, size_t(direct.bytes())), 0)
            << afm::format_name(f) << " from " << afm::dtype_name(dtype) << " " << s.rows << "x" << s.cols;
      }
    }
  }
  // A NaN in the last panel's rows.
  std::vector<float> values(40 * 64, 0.5f);
  values[35 * 64 + 20] = std::numeric_limits<float>::quiet_NaN();
  const afm::TensorView view = matrix_view(afm::DType::F32, 40, 64, reinterpret_cast<const uint8_t*>(values.data()));
  try {
    afm::cpu::int8_panels(view, WeightFormat::BFP8, afm::MatmulInputs::Int8);
    ADD_FAILURE() << "a NaN weight was packed";
  } catch (const afm::Error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite value at column 20"), std::string::npos) << e.what();
  }
  EXPECT_THROW(afm::cpu::int8_panels(view, WeightFormat::BF16, afm::MatmulInputs::Int8), afm::Error);

  const auto backend = afm::make_backend(afm::Device::cpu(), 2);
  values[35 * 64 + 20] = 0.25f;
  const Weight loaded = backend->load_matrix(view, WeightFormat::BFP8, afm::MatmulInputs::Int16);
  const Weight packed = afm::cpu::int8_panels(view, WeightFormat::BFP8, afm::MatmulInputs::Int16);
  ASSERT_EQ(loaded.layout, afm::WeightLayout::Backend);
  EXPECT_EQ(loaded.inputs, afm::MatmulInputs::Int16);
  EXPECT_EQ(std::memcmp(loaded.data, packed.data, size_t(packed.bytes())), 0);
  // Stored as bfp8 rows already (afm convert's output): those rows are packed, not converted again.
  const Weight stored_rows = afm::make_weight(view, WeightFormat::BFP8);
  afm::TensorView stored = view;
  stored.dtype = afm::DType::BFP8;
  stored.data = stored_rows.data;
  stored.nbytes = stored_rows.bytes();
  EXPECT_FALSE(afm::converts_at_load(stored, WeightFormat::BFP8));
  const Weight from_stored = backend->load_matrix(stored, WeightFormat::BFP8, afm::MatmulInputs::Int16);
  ASSERT_EQ(from_stored.layout, afm::WeightLayout::Backend);
  EXPECT_EQ(std::memcmp(from_stored.data, packed.data, size_t(packed.bytes())), 0);
  // bf16 activations keep rows.
  EXPECT_EQ(backend->load_matrix(view, WeightFormat::BFP8, afm::MatmulInputs::BF16).layout, afm::WeightLayout::Rows);
}

TEST(Int8Gemm, NonFiniteActivationsGiveNaN) {
  if (!afm::cpu::int8_gemm_supported(Isa::Avx512Vnni)) GTEST_SKIP() << "CPU has no AVX-512 VNNI";
  afm::cpu::ThreadPool pool(1);
  std::mt19937 rng(8);
  const Matrix m = afm::test::make_matrix(WeightFormat::BFP8, 8, 64, afm::MatmulInputs::Int8, rng);
  std::vector<float> x(2 * 64, 0.25f);
  x[64 + 20] = std::numeric_limits<float>::infinity();
  afm::cpu::Int8Rows q;
  afm::cpu::quantize_int8_rows(WeightFormat::BFP8, x.data(), 2, 64, q);
  std::vector<float> out(2 * 8);
  afm::cpu::int8_gemm(m.weight, q, out.data(), pool, Isa::Avx512Vnni);
  for (int n = 0; n < 8; n++) {
    EXPECT_TRUE(std::isfinite(out[n])) << n;
    EXPECT_TRUE(std::isnan(out[8 + n])) << n;
  }
}

TEST(Int8Gemm, ParallelQuantizationEqualsSerial) {
  std::mt19937 rng(4);
  afm::cpu::ThreadPool pool(2);
  const int64_t rows = 37, k = 2600;
  const std::vector<float> x = random_activations(rows, k, rng);
  afm::cpu::Int8Rows serial, parallel;
  afm::cpu::quantize_int8_rows(WeightFormat::BFP8, x.data(), rows, k, serial);
  afm::cpu::quantize_int8_rows(WeightFormat::BFP8, x.data(), rows, k, parallel, &pool);
  EXPECT_EQ(serial.q, parallel.q);
  EXPECT_EQ(serial.scale, parallel.scale);
  EXPECT_EQ(serial.offset_sums, parallel.offset_sums);
  EXPECT_EQ(serial.block_offset_sums, parallel.block_offset_sums);
}

TEST(Int8Gemm, RejectsOtherFormatsAndMismatchedActivations) {
  if (!afm::cpu::int8_gemm_supported(Isa::Avx512Vnni)) GTEST_SKIP() << "CPU has no AVX-512 VNNI";
  afm::cpu::ThreadPool pool(1);
  std::mt19937 rng(2);
  Matrix m = afm::test::make_matrix(WeightFormat::BFP8, 4, 32, afm::MatmulInputs::Int8, rng);
  const std::vector<float> x(16 * 48, 1.0f);
  afm::cpu::Int8Rows q;
  afm::cpu::quantize_int8_rows(WeightFormat::BFP8, x.data(), 16, 48, q);
  std::vector<float> out(16 * 4);
  EXPECT_THROW(afm::cpu::int8_gemm(m.weight, q, out.data(), pool, Isa::Avx512Vnni), afm::Error);  // 48 columns, not 32
  m.weight.format = WeightFormat::BF16;
  EXPECT_THROW(afm::cpu::int8_gemm(m.weight, q, out.data(), pool, Isa::Avx512Vnni), afm::Error);
  EXPECT_THROW(afm::cpu::int8_gemm(m.weight, q, out.data(), pool, Isa::Avx2), afm::Error);
  m.weight.format = WeightFormat::BFP4;
  m.weight.cols = 48;
  EXPECT_THROW(afm::cpu::int8_gemm(m.weight, q, out.data(), pool, Isa::Avx512Vnni), afm::Error)
      << "activations quantized for bfp8 (offset 128) with bfp4 weights (offset 8)";
}

// int16 activations (quantize_int16_rows): every value, rebuilt from its two halves or read as
// itself, is within half a step of x, the step being max |x| of the block / kInt16Max, and the
// offset sums are the values' sums; threads change nothing, and the AVX-512 quantizer writes the
// portable one's bytes.
TEST(Int16Activations, EachValueIsWithinHalfAStepInBothLayouts) {
  std::mt19937 rng(21);
  afm::cpu::ThreadPool pool(2);
  const int64_t rows = 9, k = 1000;  // a partial last block and padding
  std::vector<float> x = random_activations(rows, k, rng);
  x[3 * k + 40] = -std::numeric_limits<float>::infinity();
  x[5 * k + 100] = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < 16; i++) x[6 * k + 160 + i] = 0x1p-110f * float(i);  // a tiny block: zeros
  for (int64_t i = 0; i < 16; i++) x[7 * k + 320 + i] = i % 2 ? 3e38f : -1e-3f;  // the top of f32's range
  for (WeightFormat f : {WeightFormat::BFP8, WeightFormat::BFP4})
    for (afm::cpu::Int16Layout layout : {afm::cpu::Int16Layout::Halves, afm::cpu::Int16Layout::Values}) {
      const bool halves = layout == afm::cpu::Int16Layout::Halves;
      const std::string what = afm::format_name(f) + (halves ? ", halves" : ", values");
      afm::cpu::Int8Rows q, serial;
      afm::cpu::quantize_int16_rows(f, x.data(), rows, k, q, &pool, layout);
      afm::cpu::quantize_int16_rows(f, x.data(), rows, k, serial, nullptr, layout, Isa::Scalar);
      EXPECT_EQ(q.q, serial.q) << what;
      EXPECT_EQ(q.block_offset_sums, serial.block_offset_sums) << what;
      EXPECT_EQ(std::memcmp(q.scale.data(), serial.scale.data(), q.scale.size() * sizeof(float)), 0) << what;
      ASSERT_TRUE(q.int16);
      ASSERT_EQ(q.int16_layout, layout);
      ASSERT_EQ(q.padded, 1024);
      ASSERT_EQ(q.q.size(), size_t(rows * 2 * q.padded));
      const int offset = f == WeightFormat::BFP8 ? 128 : 8;
      for (int64_t r = 0; r < rows; r++)
        for (int64_t b = 0; b < q.padded / 16; b++) {
          const float scale = q.scale[r * q.padded / 16 + b];
          if ((r == 3 && b == 40 / 16) || (r == 5 && b == 100 / 16)) {
            EXPECT_TRUE(std::isnan(scale)) << what;
            continue;
          }
          float max_abs = 0;
          for (int64_t i = 16 * b; i < std::min(k, 16 * b + 16); i++) max_abs = std::max(max_abs, std::fabs(x[r * k + i]));
          if (r == 6 && b == 160 / 16) {
            EXPECT_EQ(scale, 0.0f) << what << ": a block below 2^-100 stays zeros";
          } else {
            EXPECT_FLOAT_EQ(scale, max_abs / afm::cpu::kInt16Max) << what;
          }
          int32_t sum = 0;
          for (int64_t i = 0; i < 16; i++) {
            const int8_t* block = q.q.data() + r * 2 * q.padded + 32 * b;
            int16_t value;
            std::memcpy(&value, block + 2 * i, 2);
            const int32_t v = halves ? 256 * block[i] + block[16 + i] : value;
            ASSERT_LE(std::abs(v), afm::cpu::kInt16Max);
            const double want = 16 * b + i < k ? x[r * k + 16 * b + i] : 0.0;
            // Half a step, plus f32's rounding of x / step (up to 32639 x 2^-24, 0.002 of a step).
            ASSERT_LE(std::fabs(double(v) * scale - want), 0.505 * double(scale) + 1e-30)
                << what << ", row " << r << " value " << 16 * b + i;
            sum += v;
          }
          EXPECT_EQ(q.block_offset_sums[r * q.padded / 16 + b], -offset * sum) << what;
        }
    }
}

// int16_layout_for keeps decode and small batches on halves, which read the packed weights as
// they are, and gives a prefill values.
TEST(Int16Activations, APrefillTakesValuesAndADecodeStepHalves) {
  EXPECT_EQ(afm::cpu::int16_layout_for(1), afm::cpu::Int16Layout::Halves);
  EXPECT_EQ(afm::cpu::int16_layout_for(4), afm::cpu::Int16Layout::Halves);
  EXPECT_EQ(afm::cpu::int16_layout_for(512), afm::cpu::Int16Layout::Values);
}

// The packed GEMM on int16 activations against the double product of the exact weights with the
// rebuilt activations, on the odd shapes; and against x itself it is far closer than int8. Values
// (weights widened per slice, `vpdpwssd`) give exactly what halves give: the same integer sums.
TEST(Int16Activations, PackedGemmMatchesExactProductOnOddShapes) {
  if (!afm::cpu::int8_gemm_supported(Isa::Avx512Vnni)) GTEST_SKIP() << "CPU has no AVX-512 VNNI";
  std::mt19937 rng(13);
  afm::cpu::ThreadPool pool(2);
  struct Shape {
    int64_t tokens, rows, cols;
  };
  // Tokens around the 4-token tiles of int16 halves (and bfp4's split from 5 tokens on), the
  // 6-token tiles of values, and the 32 from which a thread's panels are multiplied together.
  const Shape shapes[] = {{1, 1, 1},     {4, 33, 17},     {5, 48, 257},  {9, 100, 513},
                          {3, 300, 2560}, {13, 31, 1000}, {31, 70, 300}, {40, 300, 600}};
  for (WeightFormat f : {WeightFormat::BFP8, WeightFormat::BFP4}) {
    for (const Shape& s : shapes) {
      const Matrix m = afm::test::make_matrix(f, s.rows, s.cols, afm::MatmulInputs::Int16, rng);
      const Weight packed = afm::cpu::int8_panels(m.weight, Isa::Avx512Vnni);
      const std::vector<float> x = random_activations(s.tokens, s.cols, rng);
      afm::cpu::Int8Rows q, q8, values;
      afm::cpu::quantize_int16_rows(f, x.data(), s.tokens, s.cols, q, &pool);
      afm::cpu::quantize_int8_rows(f, x.data(), s.tokens, s.cols, q8, &pool);
      afm::cpu::quantize_int16_rows(f, x.data(), s.tokens, s.cols, values, &pool, afm::cpu::Int16Layout::Values);
      std::vector<float> out(s.tokens * s.rows + 1, 77.0f), out8(s.tokens * s.rows), out_values = out;
      afm::cpu::int8_gemm(packed, q, out.data(), pool, Isa::Avx512Vnni);
      afm::cpu::int8_gemm(packed, q8, out8.data(), pool, Isa::Avx512Vnni);
      afm::cpu::int8_gemm(packed, values, out_values.data(), pool, Isa::Avx512Vnni);
      EXPECT_EQ(out.back(), 77.0f) << "wrote past the output";
      EXPECT_EQ(out_values, out) << afm::format_name(f) << " T=" << s.tokens << " N=" << s.rows << " K=" << s.cols;
      double error16 = 0, error8 = 0;
      for (int64_t t = 0; t < s.tokens; t++)
        for (int64_t n = 0; n < s.rows; n++) {
          double ref = 0, abs_sum = 0, exact = 0;
          for (int64_t c = 0; c < s.cols; c++) {
            const int64_t at = t * 2 * q.padded + 2 * (c / 16) * 16 + c % 16;
            const double v = 256.0 * q.q[at] + q.q[at + 16];
            const double w = m.values[n * s.cols + c];
            ref += w * v * q.scale[t * q.padded / 16 + c / 16];
            abs_sum += std::fabs(w * v * q.scale[t * q.padded / 16 + c / 16]);
            exact += w * x[t * s.cols + c];
          }
          const double tol = (s.cols / 16 + 4) * 0x1p-22 * abs_sum + 1e-30;
          ASSERT_NEAR(out[t * s.rows + n], ref, tol) << afm::format_name(f) << " T=" << s.tokens << " N=" << s.rows
                                                     << " K=" << s.cols << " at t=" << t << " n=" << n;
          error16 += std::fabs(out[t * s.rows + n] - exact);
          error8 += std::fabs(out8[t * s.rows + n] - exact);
        }
      if (s.cols >= 256) {
        EXPECT_LT(error16, error8 / 20) << afm::format_name(f) << " K=" << s.cols;
      }
    }
  }
}

TEST(Int8Gemm, OnlyAvx512VnniHasKernels) {
  EXPECT_FALSE(afm::cpu::int8_gemm_supported(Isa::Scalar));
  EXPECT_FALSE(afm::cpu::int8_gemm_supported(Isa::Avx2));
  EXPECT_FALSE(afm::cpu::int8_gemm_supported(Isa::Avx512));
}

}  // namespace
