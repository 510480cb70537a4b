// Rotary position embedding as transformers computes it: inv_freq per rope_type, an attention
// scaling applied to cos and sin, and the rotate-half layout (dims i and i + d/2 form a pair).
#pragma once
#include <cstdint>
#include <vector>

#include "config.h"

namespace afm {

struct RopeFrequencies {
  std::vector<float> inv_freq;  // [rotary_dim / 2]
  float attention_scaling = 1.0f;
};

RopeFrequencies rope_frequencies(const RopeConfig& rope, int64_t head_dim);

// cos and sin for every position below max_positions, already multiplied by attention_scaling.
struct RopeTables {
  int64_t half_dim = 0;  // rotary pairs per head
  int64_t max_positions = 0;
  std::vector<float> cos, sin;  // [max_positions, half_dim]

  const float* cos_at(int64_t pos) const { return cos.data() + pos * half_dim; }
  const float* sin_at(int64_t pos) const { return sin.data() + pos * half_dim; }
};

RopeTables rope_tables(const RopeFrequencies& freqs, int64_t max_positions);

}  // namespace afm
