// Skinny GEMM (see small_gemm.h). Dot-product form on the weight's own [N, K] layout, so weights are read row
// by row, once, and need no repacking: the decode pool (thread_pool.h) splits N into blocks of NR weight
// rows; for each block every MR rows of x are dotted with the NR weight rows at once (MR·NR vector
// accumulators), each loaded x vector feeding NR FMAs and each weight vector MR. M/N remainders use narrower
// blocks of the same template. Accumulation is float32 in vector lanes, summed at the end (as BLAS does, in another
// order).
// Two vector paths, picked at compile time (CMake builds with -march=native):
// - AVX-512: 16 lanes, 8x3 blocks (24 of the 32 zmm registers accumulate); the K tail is one masked load, whose
//   masked-off lanes read as zero (and cannot fault), so there is no scalar tail. From XT16_MIN_M rows, x is
//   transposed (xT [K, 16] per 16 rows, one zmm of lanes over x's rows) and each weight element is broadcast once
//   against it, 12 weight rows at a time (12 accumulators, no lane sums at the end), summed in chunks of XT16_KC
//   products as on AVX2: at M = 16 on 2 Zen 4 vCPUs 132-156 GFLOP/s against 93-114 for the 8x3 blocks (the
//   decode step's weights at 17-19 GB/s instead of 11-14; bench/RESULTS.md).
// - AVX2 + FMA: 8 lanes, 6x2 blocks (12 + 2 w + 1 x = 15 of 16 ymm registers), scalar K tail, below XT_MIN_M rows.
//   From XT_MIN_M rows, x is transposed instead (xT [K, 16] per 16 rows, the lanes run over x's rows): each weight
//   element is broadcast once and feeds 2 FMAs per 16 rows, 5 weight rows at a time (10 accumulators + 2 x + 1
//   broadcast: 13 registers; 6 rows spilled). In dot-product form every x row was loaded again for each weight row
//   pair, and at M = 16, K >= 576 x (36 KB+) no longer fits the 32 KB L1: the 6x2 blocks ran at 88 GFLOP/s on 2
//   Zen 3 cores with the weight in L2, the transposed form at 172 (bench/RESULTS.md). Each output is summed in chunks
//   of XT_KC products (one FMA chain each, then the chunk sums in order): a single K-long chain would round ~K·2⁻²⁴.
// In a decode step the weights stream from DRAM, so the first row block of each weight block prefetches a later
// block's rows (one prefetch per 64-byte line).
#include "small_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "common.h"
#include "thread_pool.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define DRIFTSCOPE_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DRIFTSCOPE_AVX2 1
#endif

namespace driftscope {
namespace {

#ifdef DRIFTSCOPE_AVX512
constexpr int kMR = 8;  // rows of x per block
constexpr int kNR = 3;  // rows of w per block: 24 accumulators + 3 w + 1 x = 28 zmm registers
// prefetch the rows 4 blocks ahead into L2: 17-20 GB/s -> 19-22 GB/s for a whole step at M = 16 on 2 threads,
// against 1 block ahead into L1 (bench/RESULTS.md)
constexpr int64_t kAhead = 4;
#else
constexpr int kMR = 6;  // rows of x per block
constexpr int kNR = 2;  // rows of w per block: 12 accumulators + 2 w + 1 x = 15 ymm registers
constexpr int64_t kAhead = 1;  // the next block's rows, into L1 (measured with the 6x2 blocks)
#endif
constexpr int64_t kPrefetchEvery = 16;  // floats: one prefetch per 64-byte line of each next weight row

// f(b) for every block b in [0, blocks) on the decode pool (thread_pool.h): contiguous ranges of blocks, ~8 a thread,
// so each thread streams whole stretches of the weight and claims rarely; a block's outputs are its own, so the
// result does not depend on the threads
template <class F>
void for_blocks(int64_t blocks, F&& f) {
  const int threads = max_threads();
  const int64_t tasks = std::min<int64_t>(blocks, threads > 1 ? 8 * threads : 1);
  parallel_tasks(tasks, threads, [&](int64_t t) {
    for (int64_t b = t * blocks / tasks, e = (t + 1) * blocks / tasks; b < e; ++b) f(b);
  });
}

// x's rows in chunks of 16, each packed as xT [K, lanes] (lanes = lanes_of(rows in the chunk): 16, or 8 for a chunk
// of <= 8 rows on AVX2), zero past M, at the start of each chunk's 16·K floats; 64-byte aligned, freed by std::free
template <class Lanes>
float* pack_xT(const float* x, int64_t M, int64_t K, Lanes lanes_of) {
  const int64_t chunks = (M + 15) / 16;
  float* xT = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(chunks * 16 * K) * sizeof(float)));
  check(xT != nullptr,
        "small_gemm: out of memory for x transposed (" + std::to_string(chunks * 16 * K * 4) + " bytes)");
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t mn = std::min<int64_t>(16, M - c * 16), lanes = lanes_of(mn);
    float* dst = xT + c * 16 * K;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t m = 0; m < lanes; ++m) dst[k * lanes + m] = m < mn ? x[(c * 16 + m) * K + k] : 0.0f;
  }
  return xT;
}

#ifdef DRIFTSCOPE_AVX512
// 16 lanes -> 8: lanes i and i + 8 added
inline __m256 half_sum(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));  // AVX-512F only (no DQ)
  return _mm256_add_ps(_mm512_castps512_ps256(v), hi);
}

constexpr int64_t XT16_MIN_M = 12;  // from here x is transposed (xt16_block); below, the 8x3 dot-product blocks (equal
                                    // at 12 rows, 1.13x faster at 14, 1.2-1.3x at 16 and 32: bench/RESULTS.md)
constexpr int XT16_R = 12;          // weight rows per block: 12 accumulators of 16 x rows
constexpr int64_t XT16_KC = 64;     // products per FMA chain before the chunk sum (as XT_KC on AVX2)

// out[m0..m0+mn, n0..n0+R] from xT [K, 16] (lanes: rows m0.. of x, zero past mn): each weight element broadcast
// once against 16 rows of x; chunk sums of XT16_KC products, added in chunk order
template <int R>
inline void xt16_block(float* out, const float* xT, const float* w, const float* bias, int64_t m0, int64_t mn,
                       int64_t n0, int64_t N, int64_t K, bool prefetch) {
  const float* ws[R];
  for (int r = 0; r < R; ++r) ws[r] = w + (n0 + r) * K;
  __m512 t[R];
  for (int r = 0; r < R; ++r) t[r] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < K; c0 += XT16_KC) {
    const int64_t c1 = std::min(K, c0 + XT16_KC);
    if (prefetch)
      for (int r = 0; r < R; ++r)
        for (int64_t k = c0; k < c1; k += kPrefetchEvery)
          _mm_prefetch(reinterpret_cast<const char*>(ws[r] + kAhead * R * K + k), _MM_HINT_T1);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    int64_t k = c0;
    for (; k + 4 <= c1; k += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m512 xv = _mm512_load_ps(xT + (k + u) * 16);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xv, _mm512_set1_ps(ws[r][k + u]), acc[r]);
      }
    }
    for (; k < c1; ++k) {
      const __m512 xv = _mm512_load_ps(xT + k * 16);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xv, _mm512_set1_ps(ws[r][k]), acc[r]);
    }
    for (int r = 0; r < R; ++r) t[r] = _mm512_add_ps(t[r], acc[r]);
  }
  alignas(64) float s[R][16];
  for (int r = 0; r < R; ++r) _mm512_store_ps(s[r], t[r]);
  for (int64_t m = 0; m < mn; ++m)
    for (int r = 0; r < R; ++r) out[(m0 + m) * N + n0 + r] = s[r][m] + (bias ? bias[n0 + r] : 0.0f);
}

// x packed as xT [K, 16] per 16 rows (pack_xT); the pool over blocks of XT16_R weight
// rows (then one-row blocks for the N remainder), every chunk against a block while its rows are in L1
void small_gemm_xt16(float* out, const float* x, const float* w, const float* bias, int64_t M, int64_t N, int64_t K) {
  const int64_t chunks = (M + 15) / 16;
  float* xT = pack_xT(x, M, K, [](int64_t) { return int64_t{16}; });
  const int64_t full = N / XT16_R, blocks = full + N % XT16_R;
  for_blocks(blocks, [&](int64_t b) {
    const int64_t n0 = b < full ? b * XT16_R : full * XT16_R + (b - full);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t mn = std::min<int64_t>(16, M - c * 16);
      const float* xc = xT + c * 16 * K;
      if (b < full) xt16_block<XT16_R>(out, xc, w, bias, c * 16, mn, n0, N, K, c == 0 && b + kAhead < full);
      else xt16_block<1>(out, xc, w, bias, c * 16, mn, n0, N, K, false);
    }
  });
  std::free(xT);
}

// the lane sums of 8 vectors, in one vector: [Σ r[0], ..., Σ r[7]] (a transpose by pairwise adds)
inline __m256 hsum8(const __m256* r) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));  // 128-bit halves
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

#ifdef DRIFTSCOPE_AVX2
constexpr int64_t XT_MIN_M = 8;  // below: memory-bound, where the 6x2 dot-product blocks stream faster (measured)
constexpr int XT_R = 5;          // weight rows per block over 9..16 x rows (2 vectors of lanes)
constexpr int XT_R1 = 12;        // ... over 8 x rows (1 vector): 12 accumulators
constexpr int64_t XT_KC = 64;    // products per FMA chain before it is added into the output's chunk sum

// out[m0..m0+mn, n0..n0+R] from xT [K, 8·V] (lanes: rows m0.. of x, zero past mn): R weight rows, each element
// broadcast once against V vectors of x lanes
template <int R, int V>
inline void xt_block(float* out, const float* xT, const float* w, const float* bias, int64_t m0, int64_t mn,
                     int64_t n0, int64_t N, int64_t K, bool prefetch) {
  const float* ws[R];
  for (int r = 0; r < R; ++r) ws[r] = w + (n0 + r) * K;
  alignas(32) float t[R][V * 8] = {};  // the chunk sums, added in chunk order
  for (int64_t c0 = 0; c0 < K; c0 += XT_KC) {
    const int64_t c1 = std::min(K, c0 + XT_KC);
    if (prefetch)
      for (int r = 0; r < R; ++r)
        for (int64_t k = c0; k < c1; k += kPrefetchEvery)
          _mm_prefetch(reinterpret_cast<const char*>(ws[r] + kAhead * R * K + k), _MM_HINT_T0);
    __m256 acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
    int64_t k = c0;
    for (; k + 4 <= c1; k += 4) {  // 4 k at a time in one loop body: a nested k loop kept acc on the stack (GCC)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        __m256 xv[V];
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) xv[v] = _mm256_load_ps(xT + (k + u) * 8 * V + 8 * v);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
          const __m256 b = _mm256_broadcast_ss(ws[r] + k + u);
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(xv[v], b, acc[r][v]);
        }
      }
    }
    for (; k < c1; ++k) {
      __m256 xv[V];
      for (int v = 0; v < V; ++v) xv[v] = _mm256_load_ps(xT + k * 8 * V + 8 * v);
      for (int r = 0; r < R; ++r) {
        const __m256 b = _mm256_broadcast_ss(ws[r] + k);
        for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(xv[v], b, acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v)
        _mm256_store_ps(&t[r][8 * v], _mm256_add_ps(_mm256_load_ps(&t[r][8 * v]), acc[r][v]));
  }
  for (int64_t m = 0; m < mn; ++m)
    for (int r = 0; r < R; ++r) out[(m0 + m) * N + n0 + r] = t[r][m] + (bias ? bias[n0 + r] : 0.0f);
}

// x packed as xT [K, 16] per 16 rows, [K, 8] for a chunk of <= 8 rows (pack_xT); the pool over blocks of weight
// rows, every chunk against a block while its rows are in L1
void small_gemm_xt(float* out, const float* x, const float* w, const float* bias, int64_t M, int64_t N, int64_t K) {
  const int64_t chunks = (M + 15) / 16;
  float* xT = pack_xT(x, M, K, [](int64_t mn) { return mn > 8 ? int64_t{16} : int64_t{8}; });
  const int R = M <= 8 ? XT_R1 : XT_R;
  const int64_t full = N / R, blocks = full + N % R;  // then one-row blocks for the N remainder
  for_blocks(blocks, [&](int64_t b) {
    const int64_t n0 = b < full ? b * R : full * R + (b - full);
    const bool prefetch = b + kAhead < full;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t mn = std::min<int64_t>(16, M - c * 16);
      const float* xc = xT + c * 16 * K;
      const bool pf = prefetch && c == 0;
      if (b >= full) {
        if (mn > 8) xt_block<1, 2>(out, xc, w, bias, c * 16, mn, n0, N, K, false);
        else xt_block<1, 1>(out, xc, w, bias, c * 16, mn, n0, N, K, false);
      } else if (R == XT_R1) {
        xt_block<XT_R1, 1>(out, xc, w, bias, c * 16, mn, n0, N, K, pf);
      } else if (mn > 8) {
        xt_block<XT_R, 2>(out, xc, w, bias, c * 16, mn, n0, N, K, pf);
      } else {
        xt_block<XT_R, 1>(out, xc, w, bias, c * 16, mn, n0, N, K, pf);
      }
    }
  });
  std::free(xT);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// out[m0..m0+MR, n0..n0+NR] for MR <= kMR, NR <= kNR rows
template <int MR, int NR>
inline void block(float* out, const float* x, const float* w, const float* bias, int64_t m0, int64_t n0, int64_t N,
                  int64_t K) {
  const float* xs[MR];
  const float* ws[NR];
  for (int i = 0; i < MR; ++i) xs[i] = x + (m0 + i) * K;
  for (int j = 0; j < NR; ++j) ws[j] = w + (n0 + j) * K;
  float acc[MR][NR];
  // a later block's rows, once (later row blocks of this block hit L1)
  const bool prefetch = m0 == 0 && n0 + (kAhead + 1) * NR <= N;
  int64_t k = 0;
#if defined(DRIFTSCOPE_AVX512)
  __m512 v[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) v[i][j] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    if (prefetch)
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(ws[j] + kAhead * NR * K + k), _MM_HINT_T1);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_ps(ws[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(xs[i] + k);
      for (int j = 0; j < NR; ++j) v[i][j] = _mm512_fmadd_ps(xv, wv[j], v[i][j]);
    }
  }
  if (k < K) {  // K tail: lanes past K load as 0 and add nothing
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, ws[j] + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xs[i] + k);
      for (int j = 0; j < NR; ++j) v[i][j] = _mm512_fmadd_ps(xv, wv[j], v[i][j]);
    }
    k = K;
  }
  if constexpr (MR == 8) {
    for (int j = 0; j < NR; ++j) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = half_sum(v[i][j]);
      float s[8];
      _mm256_storeu_ps(s, hsum8(r));
      for (int i = 0; i < 8; ++i) acc[i][j] = s[i];
    }
  } else {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_reduce_add_ps(v[i][j]);
  }
#elif defined(DRIFTSCOPE_AVX2)
  __m256 v[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) v[i][j] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    if (prefetch && k % kPrefetchEvery == 0)
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(ws[j] + kAhead * NR * K + k), _MM_HINT_T0);
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(xs[i] + k);
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = _mm256_loadu_ps(ws[j] + k);
      for (int i = 0; i < MR; ++i) v[i][j] = _mm256_fmadd_ps(xv[i], wv, v[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = hsum(v[i][j]);
#else
  (void)prefetch;
  (void)kPrefetchEvery;
  (void)kAhead;
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = 0.0f;
#endif
  for (; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += xs[i][k] * ws[j][k];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[(m0 + i) * N + n0 + j] = acc[i][j] + (bias ? bias[n0 + j] : 0.0f);
}

template <int NR>
inline void column_block(float* out, const float* x, const float* w, const float* bias, int64_t n0, int64_t M,
                         int64_t N, int64_t K) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) block<kMR, NR>(out, x, w, bias, m, n0, N, K);
  static_assert(kMR <= 8, "the M remainders below go up to 7");
  switch (M - m) {
    case 7: block<7, NR>(out, x, w, bias, m, n0, N, K); break;
    case 6: block<6, NR>(out, x, w, bias, m, n0, N, K); break;
    case 5: block<5, NR>(out, x, w, bias, m, n0, N, K); break;
    case 4: block<4, NR>(out, x, w, bias, m, n0, N, K); break;
    case 3: block<3, NR>(out, x, w, bias, m, n0, N, K); break;
    case 2: block<2, NR>(out, x, w, bias, m, n0, N, K); break;
    case 1: block<1, NR>(out, x, w, bias, m, n0, N, K); break;
    default: break;
  }
}

}  // namespace

void small_gemm(uintptr_t out_p, uintptr_t x_p, uintptr_t w_p, uintptr_t bias_p, int64_t M, int64_t N, int64_t K) {
  check(M >= 0 && N >= 0 && K >= 0, "small_gemm: M, N, K must be >= 0, got " + std::to_string(M) + ", " +
                                        std::to_string(N) + ", " + std::to_string(K));
  if (M == 0 || N == 0) return;
  check(out_p != 0 && x_p != 0 && w_p != 0, "small_gemm: out, x and w must be non-null");
  float* out = reinterpret_cast<float*>(out_p);
  const float* x = reinterpret_cast<const float*>(x_p);
  const float* w = reinterpret_cast<const float*>(w_p);
  const float* bias = reinterpret_cast<const float*>(bias_p);
#ifdef DRIFTSCOPE_AVX512
  if (M >= XT16_MIN_M) {
    small_gemm_xt16(out, x, w, bias, M, N, K);
    return;
  }
#endif
#ifdef DRIFTSCOPE_AVX2
  if (M >= XT_MIN_M) {
    small_gemm_xt(out, x, w, bias, M, N, K);
    return;
  }
#endif
  const int64_t full = N / kNR;
  for_blocks(full, [&](int64_t b) { column_block<kNR>(out, x, w, bias, b * kNR, M, N, K); });
  const int64_t n0 = full * kNR;
  static_assert(kNR <= 3, "the N remainders below go up to 2");
  switch (N - n0) {
    case 2: column_block<2>(out, x, w, bias, n0, M, N, K); break;
    case 1: column_block<1>(out, x, w, bias, n0, M, N, K); break;
    default: break;
  }
}

}  // namespace driftscope
