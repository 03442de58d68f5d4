// Paged decode attention (see paged_attention.h): keys and values are read in place through the block table (no gather
// copy). The decode pool (thread_pool.h) over (sequence, kv head); the query heads of one kv head share each key/value
// load. Two passes over the context: scores (then max and exp-sum), then the probability-weighted sum of values;
// float32 throughout, with the max subtracted before exp as a stable softmax does. With a sliding window (> 0) only the
// last `window` positions of each context are read. Positions are walked block by block (no division per position); the
// score pass prefetches the same row of the next block's keys and this row's values, since the rows of one kv head are
// strided (Hkv·D floats apart) and the blocks scattered; head dims 64 and 128 are compiled as constants; exp is a
// polynomial the compiler vectorizes (exp_nonpositive). At SmolLM2-135M's decode shape (16 sequences x ~200 positions,
// 9 q / 3 kv heads, D = 64) these took a layer from 1.10 to 0.66 ms on one thread (bench/RESULTS.md).
#include "paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "thread_pool.h"

namespace driftscope {

namespace {

constexpr int64_t kLineFloats = 16;  // one prefetch per 64-byte cache line

// The kernel for one head dim: DC > 0 fixes D at compile time (fully unrolled dot products and value sums for the
// common head dims); DC = 0 reads it at run time.
template <int64_t DC>
void decode(float* out, const float* q, const float* kc, const float* vc, const int32_t* bt, const int32_t* ctx,
            int64_t B, int64_t M, int64_t Hq, int64_t Hkv, int64_t D_, int64_t block_size, double scale,
            int64_t window, int64_t ldq) {
  const int64_t D = DC > 0 ? DC : D_;
  const int64_t G = Hq / Hkv;  // query heads per kv head
  const float sc = static_cast<float>(scale);
  // one task per (sequence, kv head), claimed one at a time on the decode pool (thread_pool.h)
  parallel_tasks(B * Hkv, max_threads(), [&](int64_t task) {
    thread_local std::vector<float> scores, acc;  // [G, ctx], [G, D]
    acc.resize(G * D);
    const int64_t b = task / Hkv, g = task % Hkv;
    const int64_t p0 = window > 0 && ctx[b] > window ? ctx[b] - window : 0;  // first position in the window
    const int64_t n = ctx[b] - p0;  // positions read: p0 .. ctx - 1, score index p - p0
    scores.resize(G * n);
    const float* qg = q + b * ldq + g * G * D;  // [G, D]
    const int32_t* table = bt + b * M;
    // positions p0 .. ctx - 1 block by block: slots are contiguous within a block (no division per position)
    for (int64_t p = p0; p < ctx[b];) {
      const int64_t in_block = p % block_size;
      const int64_t len = std::min<int64_t>(block_size - in_block, ctx[b] - p);
      const int64_t j = p / block_size;
      const int64_t off = ((static_cast<int64_t>(table[j]) * block_size + in_block) * Hkv + g) * D;
      const float* k = kc + off;
      const float* v = vc + off;  // this key's value, prefetched for the second pass
      // the same row of the next block (if the context reaches it): one block of look-ahead for K
      const bool ahead = (j + 1) * block_size < ctx[b];
      const float* kn =
          ahead ? kc + ((static_cast<int64_t>(table[j + 1]) * block_size + in_block) * Hkv + g) * D : k;
      for (int64_t t = 0; t < len; ++t, k += Hkv * D, v += Hkv * D, kn += Hkv * D) {
        for (int64_t d = 0; d < D; d += kLineFloats) {
          if (ahead) __builtin_prefetch(kn + d);
          __builtin_prefetch(v + d);
        }
        float* st = scores.data() + (p - p0 + t);
        for (int64_t h = 0; h < G; ++h) {
          const float* qh = qg + h * D;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qh[d] * k[d];
          st[h * n] = s * sc;
        }
      }
      p += len;
    }
    for (int64_t h = 0; h < G; ++h) {
      float* sh = scores.data() + h * n;
      float mx = sh[0];
#pragma omp simd reduction(max : mx)
      for (int64_t i = 1; i < n; ++i) mx = std::max(mx, sh[i]);
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t i = 0; i < n; ++i) {
        sh[i] = exp_nonpositive(sh[i] - mx);
        total += sh[i];
      }
      const float inv = 1.0f / total;
      for (int64_t i = 0; i < n; ++i) sh[i] *= inv;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t p = p0; p < ctx[b];) {
      const int64_t in_block = p % block_size;
      const int64_t len = std::min<int64_t>(block_size - in_block, ctx[b] - p);
      const float* v = vc + ((static_cast<int64_t>(table[p / block_size]) * block_size + in_block) * Hkv + g) * D;
      for (int64_t t = 0; t < len; ++t, v += Hkv * D) {
        const float* wt = scores.data() + (p - p0 + t);
        for (int64_t h = 0; h < G; ++h) {
          const float w = wt[h * n];
          float* a = acc.data() + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
        }
      }
      p += len;
    }
    float* og = out + (b * Hq + g * G) * D;
    for (int64_t i = 0; i < G * D; ++i) og[i] = acc[i];
  });
}

}  // namespace

void paged_decode_attention(uintptr_t out_p, uintptr_t q_p, uintptr_t k_p, uintptr_t v_p, uintptr_t bt_p,
                            uintptr_t ctx_p, int64_t B, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t block_size, int64_t num_slots, double scale, int64_t window, int64_t ldq) {
  if (ldq == 0) ldq = Hq * D;
  check(ldq >= Hq * D, "paged_decode_attention: ldq=" + std::to_string(ldq) + " < Hq·D=" + std::to_string(Hq * D));
  check(window >= 0, "paged_decode_attention: window=" + std::to_string(window) + " must be >= 0 (0: no window)");
  check(B >= 0 && M >= 0 && Hq > 0 && Hkv > 0 && D > 0 && block_size > 0,
        "paged_decode_attention: bad sizes B=" + std::to_string(B) + " M=" + std::to_string(M) + " Hq=" +
            std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D));
  check(Hq % Hkv == 0,
        "paged_decode_attention: Hq=" + std::to_string(Hq) + " not a multiple of Hkv=" + std::to_string(Hkv));
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
  with_head_dim(D, [&](auto dc) {
    decode<decltype(dc)::value>(out, q, kc, vc, bt, ctx, B, M, Hq, Hkv, D, block_size, scale, window, ldq);
  });
}

}  // namespace driftscope
