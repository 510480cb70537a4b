#include "rope.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "error.h"

namespace afm {

namespace {

// inv_freq[i] = 1 / theta^(2i/dim), in float32 like torch's arange-based formula.
std::vector<float> default_inv_freq(double theta, int64_t dim) {
  std::vector<float> inv_freq(dim / 2);
  for (int64_t i = 0; i < dim / 2; i++) {
    float exponent = float(2 * i) / float(dim);
    inv_freq[i] = float(1.0 / std::pow(theta, double(exponent)));
  }
  return inv_freq;
}

double yarn_mscale(double scale, double mscale) {
  return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

// YaRN (arXiv 2309.00071): interpolate the low frequencies by `factor`, keep the high ones,
// and blend linearly between the dimensions that complete beta_fast and beta_slow rotations
// over the original context.
RopeFrequencies yarn(const RopeConfig& rope, int64_t dim) {
  const double base = rope.theta, factor = rope.factor;
  RopeFrequencies out;
  if (rope.attention_factor) {
    out.attention_scaling = float(*rope.attention_factor);
  } else if (rope.mscale && rope.mscale_all_dim && *rope.mscale && *rope.mscale_all_dim) {
    out.attention_scaling = float(yarn_mscale(factor, *rope.mscale) / yarn_mscale(factor, *rope.mscale_all_dim));
  } else {
    out.attention_scaling = float(yarn_mscale(factor, 1.0));
  }

  const double original = double(rope.original_max_position_embeddings);
  auto correction_dim = [&](double rotations) {
    return (double(dim) * std::log(original / (rotations * 2 * M_PI))) / (2 * std::log(base));
  };
  double low = correction_dim(rope.beta_fast), high = correction_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp

  std::vector<float> extrapolation = default_inv_freq(base, dim);
  out.inv_freq.resize(dim / 2);
  for (int64_t i = 0; i < dim / 2; i++) {
    float ramp = std::clamp(float((double(i) - low) / (high - low)), 0.0f, 1.0f);
    float extrapolation_weight = 1.0f - ramp;
    float interpolation = extrapolation[i] / float(factor);
    out.inv_freq[i] = interpolation * (1.0f - extrapolation_weight) + extrapolation[i] * extrapolation_weight;
  }
  return out;
}

// Llama 3.1: divide low frequencies by `factor`, keep high ones, smooth in between.
RopeFrequencies llama3(const RopeConfig& rope, int64_t dim) {
  RopeFrequencies out;
  out.inv_freq = default_inv_freq(rope.theta, dim);
  const double old_context = double(rope.original_max_position_embeddings);
  const double low_freq_wavelen = old_context / rope.low_freq_factor;
  const double high_freq_wavelen = old_context / rope.high_freq_factor;
  for (float& f : out.inv_freq) {
    double wavelen = 2 * M_PI / f;
    if (wavelen > low_freq_wavelen) {
      f = float(f / rope.factor);
    } else if (wavelen >= high_freq_wavelen) {
      double smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor);
      f = float((1 - smooth) * f / rope.factor + smooth * f);
    }
  }
  return out;
}

}  // namespace

RopeFrequencies rope_frequencies(const RopeConfig& rope, int64_t head_dim) {
  const int64_t dim = int64_t(double(head_dim) * rope.partial_rotary_factor);
  if (dim <= 0 || dim % 2 != 0 || dim > head_dim) throw Error("rotary dimension must be even and at most head_dim");
  if (rope.type == "yarn") return yarn(rope, dim);
  if (rope.type == "llama3") return llama3(rope, dim);
  RopeFrequencies out{default_inv_freq(rope.theta, dim), 1.0f};
  if (rope.type == "linear")
    for (float& f : out.inv_freq) f = float(f / rope.factor);
  if (!rope.freq_factors.empty()) {
    if (rope.freq_factors.size() != out.inv_freq.size())
      throw Error("rope frequency factors: " + std::to_string(rope.freq_factors.size()) + " values for " +
                  std::to_string(out.inv_freq.size()) + " rotary pairs");
    for (size_t i = 0; i < out.inv_freq.size(); i++) out.inv_freq[i] /= rope.freq_factors[i];
  }
  return out;
}

RopeTables rope_tables(const RopeFrequencies& freqs, int64_t max_positions) {
  RopeTables t;
  t.half_dim = int64_t(freqs.inv_freq.size());
  t.max_positions = max_positions;
  t.cos.resize(max_positions * t.half_dim);
  t.sin.resize(max_positions * t.half_dim);
  for (int64_t pos = 0; pos < max_positions; pos++) {
    for (int64_t i = 0; i < t.half_dim; i++) {
      // transformers forms the angle as a float32 product, so do we; cos/sin then in double.
      float angle = float(pos) * freqs.inv_freq[i];
      t.cos[pos * t.half_dim + i] = float(std::cos(double(angle)) * freqs.attention_scaling);
      t.sin[pos * t.half_dim + i] = float(std::sin(double(angle)) * freqs.attention_scaling);
    }
  }
  return t;
}

}  // namespace afm
