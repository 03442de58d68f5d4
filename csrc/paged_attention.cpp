// Paged decode attention (see paged_attention.h): keys and values are read in place through the block table (no
// gather copy). OpenMP over (sequence, kv head); the query heads of one kv head share each key/value load. Two
// passes over the context: scores (then max and exp-sum), then the probability-weighted sum of values; float32
// throughout, with the max subtracted before exp as a stable softmax does. With a sliding window (> 0) only the last
// `window` positions of each context are read.
#include "paged_attention.h"

#include <cmath>
#include <string>
#include <vector>

#include "common.h"

namespace driftscope {

void paged_decode_attention(uintptr_t out_p, uintptr_t q_p, uintptr_t k_p, uintptr_t v_p, uintptr_t bt_p,
                            uintptr_t ctx_p, int64_t B, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t block_size, int64_t num_slots, double scale, int64_t window) {
  check(window >= 0, "paged_decode_attention: window=" + std::to_string(window) + " must be >= 0 (0: no window)");
  check(B >= 0 && M >= 0 && Hq > 0 && Hkv > 0 && D > 0 && block_size > 0,
        "paged_decode_attention: bad sizes B=" + std::to_string(B) + " M=" + std::to_string(M) + " Hq=" +
            std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D));
  check(Hq % Hkv == 0, "paged_decode_attention: Hq=" + std::to_string(Hq) + " not a multiple of Hkv=" + std::to_string(Hkv));
  if (B == 0) return;
  float* out = reinterpret_cast<float*>(out_p);
  const float* q = reinterpret_cast<const float*>(q_p);
  const float* kc = reinterpret_cast<const float*>(k_p);
  const float* vc = reinterpret_cast<const float*>(v_p);
  const int32_t* bt = reinterpret_cast<const int32_t*>(bt_p);
  const int32_t* ctx = reinterpret_cast<const int32_t*>(ctx_p);
  for (int64_t b = 0; b < B; ++b) {
    check(ctx[b] >= 1 && ctx[b] <= M * block_size,
          "paged_decode_attention: context_lens[" + std::to_string(b) + "]=" + std::to_string(ctx[b]) +
              " outside [1, " + std::to_string(M * block_size) + "]");
    for (int64_t j = 0; j < (ctx[b] + block_size - 1) / block_size; ++j) {
      const int64_t blk = bt[b * M + j];
      check(blk >= 0 && (blk + 1) * block_size <= num_slots,
            "paged_decode_attention: block_tables[" + std::to_string(b) + ", " + std::to_string(j) + "]=" +
                std::to_string(blk) + " outside the cache");
    }
  }
  const int64_t G = Hq / Hkv;  // query heads per kv head
  const float sc = static_cast<float>(scale);
#pragma omp parallel
  {
    std::vector<float> scores;  // [G, ctx]
    std::vector<float> acc(G * D);
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t p0 = window > 0 && ctx[b] > window ? ctx[b] - window : 0;  // first position in the window
        const int64_t n = ctx[b] - p0;  // positions read: p0 .. ctx - 1, score index p - p0
        scores.resize(G * n);
        const float* qg = q + (b * Hq + g * G) * D;  // [G, D]
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = p0 + i;
          const int64_t slot = static_cast<int64_t>(bt[b * M + p / block_size]) * block_size + p % block_size;
          const float* k = kc + (slot * Hkv + g) * D;
          for (int64_t h = 0; h < G; ++h) {
            const float* qh = qg + h * D;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qh[d] * k[d];
            scores[h * n + i] = s * sc;
          }
        }
        for (int64_t h = 0; h < G; ++h) {
          float* sh = scores.data() + h * n;
          float mx = sh[0];
          for (int64_t p = 1; p < n; ++p) mx = std::max(mx, sh[p]);
          float total = 0.0f;
          for (int64_t p = 0; p < n; ++p) {
            sh[p] = std::exp(sh[p] - mx);
            total += sh[p];
          }
          const float inv = 1.0f / total;
          for (int64_t p = 0; p < n; ++p) sh[p] *= inv;
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = p0 + i;
          const int64_t slot = static_cast<int64_t>(bt[b * M + p / block_size]) * block_size + p % block_size;
          const float* v = vc + (slot * Hkv + g) * D;
          for (int64_t h = 0; h < G; ++h) {
            const float w = scores[h * n + i];
            float* a = acc.data() + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
          }
        }
        float* og = out + (b * Hq + g * G) * D;
        for (int64_t i = 0; i < G * D; ++i) og[i] = acc[i];
      }
    }
  }
}

}  // namespace driftscope
