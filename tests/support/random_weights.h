// Random weight rows in every format, with the exact value of each stored weight computed
// independently of the kernels: the inputs of the kernel tests (test_dot, test_gemm, test_int8_gemm).
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "blockfloat.h"
#include "weight.h"

namespace afm::test {

inline constexpr WeightFormat kAllWeightFormats[] = {WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16,
                                                     WeightFormat::BFP8, WeightFormat::BFP4};

// IEEE half from its fields, written independently of the kernel's converter.
inline double half_value(uint16_t h) {
  const int exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  const double mag = exp == 0 ? std::ldexp(man, -24) : std::ldexp(1024 + man, exp - 25);
  return h & 0x8000 ? -mag : mag;
}

// One weight row of k columns in `format`, plus the exact value of each stored weight.
struct Row {
  std::vector<uint8_t> bytes;
  std::vector<double> values;
};

inline Row make_row(WeightFormat f, int64_t k, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  Row row;
  row.values.resize(k);
  switch (f) {
    case WeightFormat::F32:
    case WeightFormat::BF16: {
      for (int64_t i = 0; i < k; i++) {
        const uint32_t b = std::bit_cast<uint32_t>(normal(rng));
        if (f == WeightFormat::F32) {
          row.bytes.insert(row.bytes.end(), {uint8_t(b), uint8_t(b >> 8), uint8_t(b >> 16), uint8_t(b >> 24)});
          row.values[i] = std::bit_cast<float>(b);
        } else {
          row.bytes.insert(row.bytes.end(), {uint8_t(b >> 16), uint8_t(b >> 24)});  // truncated to bf16
          row.values[i] = std::bit_cast<float>(b & 0xFFFF0000u);
        }
      }
      break;
    }
    case WeightFormat::F16: {  // random finite bit patterns: subnormals and large values included
      std::uniform_int_distribution<int> bits(0, 0xFFFF);
      for (int64_t i = 0; i < k; i++) {
        uint16_t h;
        do h = uint16_t(bits(rng));
        while (((h >> 10) & 0x1F) == 0x1F);
        row.bytes.insert(row.bytes.end(), {uint8_t(h), uint8_t(h >> 8)});
        row.values[i] = half_value(h);
      }
      break;
    }
    case WeightFormat::BFP8:
    case WeightFormat::BFP4: {
      std::vector<float> src(k), back(k);
      std::uniform_int_distribution<int> scale_exp(-8, 8);
      for (int64_t i = 0; i < k; i++) {
        if (i % 16 == 0) src[i] = std::ldexp(1.0f, scale_exp(rng));  // blocks of different scales
        else src[i] = normal(rng) * std::ldexp(1.0f, scale_exp(rng) / 4);
      }
      row.bytes.resize(afm::block_float_row_bytes(f, k));
      afm::block_float_quantize_row(f, src.data(), k, row.bytes.data());
      afm::block_float_dequantize_row(f, row.bytes.data(), k, back.data());
      for (int64_t i = 0; i < k; i++) row.values[i] = back[i];
      break;
    }
  }
  return row;
}

// A matrix of make_row rows: the bytes, the exact values, and a Weight over the bytes that reads
// its matmul inputs as `inputs`.
struct Matrix {
  std::vector<uint8_t> bytes;
  std::vector<double> values;  // [rows][cols]
  Weight weight;
};

inline Matrix make_matrix(WeightFormat f, int64_t rows, int64_t cols, MatmulInputs inputs, std::mt19937& rng) {
  Matrix m;
  for (int64_t r = 0; r < rows; r++) {
    const Row row = make_row(f, cols, rng);
    m.bytes.insert(m.bytes.end(), row.bytes.begin(), row.bytes.end());
    m.values.insert(m.values.end(), row.values.begin(), row.values.end());
  }
  m.weight.format = f;
  m.weight.rows = rows;
  m.weight.cols = cols;
  m.weight.row_bytes = int64_t(m.bytes.size()) / rows;
  m.weight.data = m.bytes.data();
  m.weight.inputs = inputs;
  return m;
}

}  // namespace afm::test
