#include "backends/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "backends/cpu/dot.h"

namespace afm::cpu {

void cache_update(KVCache& cache, int64_t layer, const Tensor& k, const Tensor& v,
                  std::span<const int32_t> positions) {
  const KVShape& s = cache.shape();
  for (int64_t t = 0; t < k.rows; t++) {
    for (int64_t h = 0; h < s.num_kv_heads; h++) {
      std::copy_n(k.row(t) + h * s.head_dim, s.head_dim, cache.key(layer, h, positions[t]));
      std::copy_n(v.row(t) + h * s.head_dim, s.head_dim, cache.value(layer, h, positions[t]));
    }
  }
}

// Per token and kv head: the `group` query heads that share it are adjacent in q, so each key
// is read once and scored against all of them with the SIMD dot kernel (keys are f32 rows).
void attention(const Tensor& q, KVCache& cache, int64_t layer, std::span<const int32_t> positions, Tensor& out,
               ThreadPool& pool) {
  const KVShape& s = cache.shape();
  const int64_t head_dim = s.head_dim, group = q.cols / head_dim / s.num_kv_heads;
  const float scale = 1.0f / std::sqrt(float(head_dim));
  const DotFn dot = dot_kernel(WeightFormat::F32);
  const int64_t work = q.rows * q.cols * (positions.back() + 1);
  pool.parallel_for(q.rows * s.num_kv_heads, 1, work, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [group][visible]
    for (int64_t item = begin; item < end; item++) {
      const int64_t t = item / s.num_kv_heads, kv_head = item % s.num_kv_heads;
      const int64_t visible = int64_t(positions[t]) + 1;
      const float* queries = q.row(t) + kv_head * group * head_dim;
      scores.resize(group * visible);
      for (int64_t p = 0; p < visible; p++) {
        const auto* key = reinterpret_cast<const uint8_t*>(cache.key(layer, kv_head, p));
        float dots[kMaxDotRows];
        for (int64_t h0 = 0; h0 < group; h0 += kMaxDotRows) {
          const int n = int(std::min<int64_t>(kMaxDotRows, group - h0));
          dot(key, queries + h0 * head_dim, head_dim, n, head_dim, dots);
          for (int j = 0; j < n; j++) scores[(h0 + j) * visible + p] = dots[j] * scale;
        }
      }
      for (int64_t h = 0; h < group; h++) {  // softmax of each head's row, in place
        float* row = &scores[h * visible];
        const float max_score = *std::max_element(row, row + visible);
        float sum = 0;
        for (int64_t p = 0; p < visible; p++) sum += row[p] = std::exp(row[p] - max_score);
        for (int64_t p = 0; p < visible; p++) row[p] /= sum;
      }
      float* o = out.row(t) + kv_head * group * head_dim;
      std::fill_n(o, group * head_dim, 0.0f);
      for (int64_t p = 0; p < visible; p++) {
        const float* value = cache.value(layer, kv_head, p);
        for (int64_t h = 0; h < group; h++) {
          const float weight = scores[h * visible + p];
          for (int64_t d = 0; d < head_dim; d++) o[h * head_dim + d] += weight * value[d];
        }
      }
    }
  });
}

}  // namespace afm::cpu
