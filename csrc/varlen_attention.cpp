// Causal attention over packed variable-length sequences, float32 (see varlen_attention.h). Flash-style: OpenMP
// over work items (sequence, kv head, block of QB query positions); an item's rows are the G query heads of its kv
// head at QB positions (G·QB rows), so each key and value row loaded serves all G heads. Keys go in blocks of KB:
// the block is transposed into Kt [D, KB] (L1), scores S = Q·Kt with RS rows at a time (each Kt vector feeds RS
// FMAs), masked (causal, window) and folded into a running max / sum per row (online softmax: O and the sum are
// rescaled by e^(m_old - m_new) when the max grows), then O += P·V with RS rows at a time (each value vector feeds
// RS FMAs). Key blocks start at the item's first visible key and end at its last query, so the causal upper triangle
// is skipped block-wise. q is scaled before the dot products (as SDPA does); float32 throughout, exp by the
// vectorizable polynomial exp_nonpositive. Vectors are GCC vector extensions of the widest enabled width (16 lanes
// with AVX-512, 8 with AVX2, 4 otherwise); D must be a multiple of the lane count (the launcher checks).
#include "varlen_attention.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.h"

namespace driftscope {
namespace {

#if defined(__AVX512F__)
constexpr int kVW = 16;
constexpr int kRS = 4;  // rows a time: scores 4 x 2 accumulators, values 4 x D/16 (16 at D = 64)
#elif defined(__AVX2__)
constexpr int kVW = 8;
constexpr int kRS = 2;  // scores 2 x 4 accumulators, values 2 x D/8 (16 at D = 64: all ymm registers)
#else
constexpr int kVW = 4;
constexpr int kRS = 2;
#endif
typedef float vf __attribute__((vector_size(kVW * 4)));
typedef float vfu __attribute__((vector_size(kVW * 4), aligned(4)));  // unaligned loads and stores

constexpr int64_t kQB = 32;  // query positions per work item
constexpr int64_t kKB = 32;  // keys per block
constexpr int64_t kNS = kKB / kVW;  // score vectors per row

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

struct Work {
  std::vector<float> qs, o, s, kt, m, l;
  explicit Work(int64_t rows, int64_t D)
      : qs(rows * D), o(rows * D), s(rows * kKB), kt(D * kKB), m(rows), l(rows) {}
};

// S[r][0..KB) = Qs[r] · Kt for rows r0 .. r0 + R (R <= kRS)
template <int R, int64_t DC>
inline void scores(const float* qs, const float* kt, float* s, int64_t D_) {
  const int64_t D = DC > 0 ? DC : D_;
  vf acc[R][kNS];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kNS; ++c) acc[r][c] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    vf k[kNS];
    for (int c = 0; c < kNS; ++c) k[c] = load(kt + d * kKB + c * kVW);
    for (int r = 0; r < R; ++r) {
      const float a = qs[r * D + d];
      for (int c = 0; c < kNS; ++c) acc[r][c] += a * k[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kNS; ++c) store(s + r * kKB + c * kVW, acc[r][c]);
}

// O[r] += Σ_j P[r][j] · V[j] for rows r0 .. r0 + R, keys 0 .. nk
template <int R, int64_t DC>
inline void values(const float* p, const float* v, int64_t sv, int64_t nk, float* o, int64_t D_) {
  const int64_t D = DC > 0 ? DC : D_;
  constexpr int64_t NV = DC > 0 ? DC / kVW : 1;
  if constexpr (DC > 0) {
    vf acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < NV; ++c) acc[r][c] = load(o + r * D + c * kVW);
    for (int64_t j = 0; j < nk; ++j) {
      const float* vj = v + j * sv;
      for (int64_t c = 0; c < NV; ++c) {
        const vf x = load(vj + c * kVW);
        for (int r = 0; r < R; ++r) acc[r][c] += p[r * kKB + j] * x;
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < NV; ++c) store(o + r * D + c * kVW, acc[r][c]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < nk; ++j) {
        const float w = p[r * kKB + j];
        const float* vj = v + j * sv;
        for (int64_t c = 0; c < D; c += kVW) store(o + r * D + c, load(o + r * D + c) + w * load(vj + c));
      }
  }
}

template <int64_t DC>
void run(float* out, const float* q, const float* k, const float* v, const int32_t* cu, int64_t B, int64_t Hq,
         int64_t Hkv, int64_t D_, int64_t sq, int64_t sk, int64_t sv, float scale, int64_t window) {
  const int64_t D = DC > 0 ? DC : D_;
  const int64_t G = Hq / Hkv;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, first query position)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t q0 = cu[b]; q0 < cu[b + 1]; q0 += kQB) blocks.emplace_back(b, q0);
  const int64_t n_items = static_cast<int64_t>(blocks.size()) * Hkv;
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    Work w(G * kQB, D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const auto [b, q0] = blocks[item / Hkv];
      const int64_t g = item % Hkv;
      const int64_t s0 = cu[b], q1 = std::min<int64_t>(cu[b + 1], q0 + kQB), nq = q1 - q0, R = G * nq;
      for (int64_t h = 0; h < G; ++h)  // row h·nq + i: head g·G + h at position q0 + i
        for (int64_t i = 0; i < nq; ++i) {
          const float* src = q + (q0 + i) * sq + (g * G + h) * D;
          float* dst = w.qs.data() + (h * nq + i) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
        }
      std::fill(w.o.begin(), w.o.begin() + R * D, 0.0f);
      std::fill(w.m.begin(), w.m.begin() + R, neg_inf);
      std::fill(w.l.begin(), w.l.begin() + R, 0.0f);
      const int64_t k_lo = window > 0 ? std::max(s0, q0 - window + 1) : s0;
      for (int64_t k0 = k_lo; k0 < q1; k0 += kKB) {
        const int64_t nk = std::min(kKB, q1 - k0);
        for (int64_t j = 0; j < kKB; ++j) {  // key rows read contiguously, written down Kt's columns (L1)
          if (j < nk) {
            const float* kj = k + (k0 + j) * sk + g * D;
            for (int64_t d = 0; d < D; ++d) w.kt[d * kKB + j] = kj[d];
          } else {
            for (int64_t d = 0; d < D; ++d) w.kt[d * kKB + j] = 0.0f;
          }
        }
        int64_t r = 0;
        for (; r + kRS <= R; r += kRS) scores<kRS, DC>(w.qs.data() + r * D, w.kt.data(), w.s.data() + r * kKB, D);
        for (; r < R; ++r) scores<1, DC>(w.qs.data() + r * D, w.kt.data(), w.s.data() + r * kKB, D);
        for (r = 0; r < R; ++r) {  // mask, online softmax; a row with no visible key here gets P = 0
          const int64_t i = q0 + r % nq;  // the query position
          const int64_t lo = window > 0 ? std::max<int64_t>(0, i - window + 1 - k0) : 0;
          const int64_t hi = std::min(nk - 1, i - k0);  // keys k0 + j <= i
          float* sr = w.s.data() + r * kKB;
          if (hi < lo) {
            std::fill(sr, sr + kKB, 0.0f);
            continue;
          }
          float mb = sr[lo];
          for (int64_t j = lo + 1; j <= hi; ++j) mb = sr[j] > mb ? sr[j] : mb;
          const float mn = w.m[r] > mb ? w.m[r] : mb;
          const float alpha = exp_nonpositive(w.m[r] - mn);  // 0 for the first block (m = -inf)
          float total = 0.0f;
#pragma omp simd reduction(+ : total)
          for (int64_t j = 0; j < kKB; ++j) {
            const float e = (j >= lo && j <= hi) ? exp_nonpositive(sr[j] - mn) : 0.0f;
            sr[j] = e;
            total += e;
          }
          w.l[r] = w.l[r] * alpha + total;
          w.m[r] = mn;
          if (alpha != 1.0f) {
            float* orow = w.o.data() + r * D;
            for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
          }
        }
        const float* vb = v + k0 * sv + g * D;
        for (r = 0; r + kRS <= R; r += kRS)
          values<kRS, DC>(w.s.data() + r * kKB, vb, sv, nk, w.o.data() + r * D, D);
        for (; r < R; ++r) values<1, DC>(w.s.data() + r * kKB, vb, sv, nk, w.o.data() + r * D, D);
      }
      for (int64_t h = 0; h < G; ++h)
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t r = h * nq + i;
          const float inv = 1.0f / w.l[r];  // every query sees at least itself: l >= 1
          const float* src = w.o.data() + r * D;
          float* dst = out + ((q0 + i) * Hq + g * G + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * inv;
        }
    }
  }
}

}  // namespace

int64_t varlen_attention_lanes() { return kVW; }

void varlen_attention(uintptr_t out_p, uintptr_t q_p, uintptr_t k_p, uintptr_t v_p, uintptr_t cu_p, int64_t B,
                      int64_t Hq, int64_t Hkv, int64_t D, int64_t sq, int64_t sk, int64_t sv, double scale,
                      int64_t window) {
  check(B >= 0 && Hq > 0 && Hkv > 0 && D > 0 && Hq % Hkv == 0,
        "varlen_attention: bad sizes B=" + std::to_string(B) + " Hq=" + std::to_string(Hq) + " Hkv=" +
            std::to_string(Hkv) + " D=" + std::to_string(D));
  check(D % kVW == 0, "varlen_attention: D=" + std::to_string(D) + " is not a multiple of " + std::to_string(kVW));
  check(window >= 0, "varlen_attention: window=" + std::to_string(window) + " must be >= 0 (0: no window)");
  const int32_t* cu = reinterpret_cast<const int32_t*>(cu_p);
  for (int64_t b = 0; b < B; ++b)
    check(cu[b] >= 0 && cu[b] <= cu[b + 1], "varlen_attention: cu_seqlens is not non-decreasing at " +
                                                std::to_string(b));
  float* out = reinterpret_cast<float*>(out_p);
  const float* q = reinterpret_cast<const float*>(q_p);
  const float* k = reinterpret_cast<const float*>(k_p);
  const float* v = reinterpret_cast<const float*>(v_p);
  const float sc = static_cast<float>(scale);
  with_head_dim(D, [&](auto dc) {
    run<decltype(dc)::value>(out, q, k, v, cu, B, Hq, Hkv, D, sq, sk, sv, sc, window);
  });
}

}  // namespace driftscope
