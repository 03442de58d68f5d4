// Skinny GEMM (see small_gemm.h). Dot-product form on the weight's own [N, K] layout, so weights are read row
// by row, once, and need no repacking: OpenMP splits N into blocks of NR weight rows; for each block every MR
// rows of x are dotted with the NR weight rows at once (MR·NR vector accumulators), each loaded x vector feeding
// NR FMAs and each weight vector MR. M/N remainders use narrower blocks of the same template. Accumulation is
// float32 in vector lanes, summed at the end (as BLAS does, in another order).
// Two vector paths, picked at compile time (CMake builds with -march=native):
// - AVX-512: 16 lanes, 8x3 blocks (24 of the 32 zmm registers accumulate); the K tail is one masked load, whose
//   masked-off lanes read as zero (and cannot fault), so there is no scalar tail.
// - AVX2 + FMA: 8 lanes, 6x2 blocks (12 + 2 w + 1 x = 15 of 16 ymm registers), scalar K tail.
// At M = 16 the 6x2 AVX2 blocks ran at the AVX2 FMA peak (~85 GFLOP/s a core with the weight in cache), so a decode
// step was compute-bound; 16 lanes reach ~115 GFLOP/s (bench/RESULTS.md). In a decode step the weights stream from
// DRAM, so the first row block of each weight block prefetches a later block's rows (one prefetch per 64-byte line).
#include "small_gemm.h"

#include <algorithm>
#include <string>

#include "common.h"

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

#ifdef DRIFTSCOPE_AVX512
// 16 lanes -> 8: lanes i and i + 8 added
inline __m256 half_sum(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));  // AVX-512F only (no DQ)
  return _mm256_add_ps(_mm512_castps512_ps256(v), hi);
}

// the lane sums of 8 vectors, in one vector: [Σ r[0], ..., Σ r[7]] (a transpose by pairwise adds)
inline __m256 hsum8(const __m256* r) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));  // 128-bit halves
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(r[4], r[5]), _mm256_hadd_ps(r[6], r[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

#ifdef DRIFTSCOPE_AVX2
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
  const int64_t full = N / kNR;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < full; ++b) column_block<kNR>(out, x, w, bias, b * kNR, M, N, K);
  const int64_t n0 = full * kNR;
  static_assert(kNR <= 3, "the N remainders below go up to 2");
  switch (N - n0) {
    case 2: column_block<2>(out, x, w, bias, n0, M, N, K); break;
    case 1: column_block<1>(out, x, w, bias, n0, M, N, K); break;
    default: break;
  }
}

}  // namespace driftscope
