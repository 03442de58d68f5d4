// Streaming covariance statistics in float64 (see cov_update.h). x [n, d] is read row by row in its own dtype
// (float32 or float64): KB rows at a time are packed into a float64 panel, block-major (TILE columns × KB rows per
// block, contiguous; the last block zero-padded); then every TILE x TILE block (bi, bj), bj >= bi, of the upper
// triangle accumulates the panel's rows as rank-1 updates in registers (a TILE-wide vector times TILE broadcast
// elements: the GEMM micro-kernel shape), GI blocks of one block column at a time (a strip: each broadcast feeds GI
// FMAs). A strip's sums over all panels are kept in the thread's strip-ordered buffer and added into S[bi, bj] and
// S[bj, bi] once at the end; a diagonal block keeps its upper triangle and mirrors it, so S stays exactly
// symmetric. One OpenMP region: each thread packs its own panel (590 KB at d = 576) and owns a fixed share of the
// strips and column sums. Every sum is taken in row order by one thread, so the result does not depend on the
// thread count (nor on GI: strips give the bits of one block at a time).
// Measured (d = 576, n = 3,860 float32 rows, 2 threads, AMD EPYC Zen 3, 512 KiB L2 a core): 35.5 ms with row-major
// panels and S updated per panel, 24.2 ms block-major, 19.7 ms with the strip buffer (65 GFLOP/s of the d²/2
// products; bench/RESULTS.md). Earlier, Intel Xeon (2 MiB L2): 0.07 s against 0.29 s for torch's upcast + float64
// GEMM at n = 7,042, which does the d² products where this does d²/2.
#include "cov_update.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace driftscope {
namespace {

#ifdef __AVX512F__
constexpr int64_t TILE = 8;  // one float64 vector
constexpr int64_t GI = 3;    // i-blocks per strip: 24 accumulators + 3 row vectors + a broadcast of 32 registers
#elif defined(__AVX2__)
constexpr int64_t TILE = 4;  // AVX2: 16 registers; 8-wide tiles spill (measured 5x slower)
constexpr int64_t GI = 2;    // 8 accumulators + 2 row vectors + a broadcast
#else
constexpr int64_t TILE = 4;  // no AVX: each vec is two SSE registers; strips spill (GI = 2 was 6x slower)
constexpr int64_t GI = 1;
#endif
constexpr int64_t KB = 128;  // rows per panel
typedef double vec __attribute__((vector_size(TILE * sizeof(double))));  // GCC/Clang vector extension

// NI consecutive i-blocks bi.. against the j-block bj over the panel's kn rows, added into the strip's own
// NI·TILE·TILE sums Tb (acc[g][q] lane p at Tb[(g·TILE + q)·TILE + p]). Each row's TILE broadcasts of the j-block feed
// NI·TILE FMAs (NI = 1 made one broadcast load per FMA: load-bound). The panel is block-major (P[b][k][t] =
// x[k0 + k, b·TILE + t]), so a block's rows are one contiguous 32·KB-byte run read front to back. Every entry is
// Σ_k in row order by one FMA chain, the same arithmetic as one block at a time.
template <int NI>
inline void block_strip(double* Tb, const double* P, int64_t kn, int64_t bi, int64_t bj) {
  vec acc[NI][TILE] = {};  // registers (unrolled, and read by lane only after the loop, from a copy: lane reads kept
  const double* pi = P + bi * KB * TILE;  // them in memory)
  const double* pj = P + bj * KB * TILE;
  for (int64_t k = 0; k < kn; ++k) {
    vec xi[NI];
#pragma GCC unroll 4
    for (int g = 0; g < NI; ++g) std::memcpy(&xi[g], pi + (g * KB + k) * TILE, sizeof(vec));
#pragma GCC unroll 8
    for (int64_t q = 0; q < TILE; ++q) {
      const double b = pj[k * TILE + q];
#pragma GCC unroll 4
      for (int g = 0; g < NI; ++g) acc[g][q] += xi[g] * b;
    }
  }
  double out[NI * TILE * TILE];
  std::memcpy(out, acc, sizeof(out));
  for (int e = 0; e < NI * TILE * TILE; ++e) Tb[e] += out[e];
}

// S += a strip's sums: block (i, j) into S[i, j] and mirrored into S[j, i]; a diagonal block's upper triangle only,
// mirrored, so S stays exactly symmetric.
inline void scatter(double* S, const double* Tb, int64_t blocks, int64_t d, int64_t bi, int64_t bj) {
  const int64_t i0 = bi * TILE, j0 = bj * TILE;
  const int64_t qn = std::min(TILE, d - j0);
  for (int64_t g = 0; g < blocks; ++g) {
    const int64_t ig = i0 + g * TILE, pn = std::min(TILE, d - ig);
    for (int64_t p = 0; p < pn; ++p) {
      for (int64_t q = ig == j0 ? p : 0; q < qn; ++q) {
        const double v = Tb[(g * TILE + q) * TILE + p];
        S[(ig + p) * d + j0 + q] += v;
        if (ig + p != j0 + q) S[(j0 + q) * d + ig + p] += v;  // mirror: only this block writes (j, i)
      }
    }
  }
}

template <typename T>
void cov_rows(double* sx, double* S, const T* X, int64_t n, int64_t d, int64_t ld) {
  const int64_t nb = (d + TILE - 1) / TILE;
  const int64_t panel = nb * KB * TILE;  // doubles per thread's panel, block-major (see block_strip)
  constexpr int64_t SB = GI * TILE * TILE;  // sums per strip
  std::vector<int64_t> strips;  // (bi, blocks, bj): up to GI i-blocks bi.. <= bj of the upper triangle, bj-major
  strips.reserve(static_cast<size_t>(nb * (nb / GI + 1) * 3));
  for (int64_t bj = 0; bj < nb; ++bj)
    for (int64_t bi = 0; bi <= bj; bi += GI) strips.insert(strips.end(), {bi, std::min(GI, bj + 1 - bi), bj});
  const int64_t n_strips = static_cast<int64_t>(strips.size()) / 3;
  bool oom = false;

  // One parallel region, no barrier inside: each thread packs its own panel and owns a fixed share of the strips
  // and of the column sums, so a thread the OS deschedules delays only its own share (a barrier per panel made
  // every thread wait for it, 64 times per call on a loaded machine).
#pragma omp parallel
  {
    int64_t t = 0, nt = 1;
#ifdef DRIFTSCOPE_OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    const int64_t s_lo = n_strips * t / nt, s_hi = n_strips * (t + 1) / nt;
    const int64_t c_lo = d * t / nt, c_hi = d * (t + 1) / nt;
    double* P = static_cast<double*>(std::aligned_alloc(64, static_cast<size_t>(panel) * sizeof(double)));
    // this thread's strips' sums over all panels, in strip order (written front to back, added into S once at the
    // end: adding each panel's strip sums straight into S scattered 2·GI·TILE read-modify-writes over the d×d
    // matrix per strip and panel, ~40% of the time at d = 576 on a 512 KiB-L2 core)
    double* Tt = static_cast<double*>(std::calloc(static_cast<size_t>((s_hi - s_lo) * SB), sizeof(double)));
    if (P == nullptr || Tt == nullptr) {
#pragma omp atomic write
      oom = true;
    } else {
      std::fill(P, P + panel, 0.0);  // the last block's padding columns stay 0
      for (int64_t k0 = 0; k0 < n; k0 += KB) {
        const int64_t kn = std::min(KB, n - k0);
        for (int64_t k = 0; k < kn; ++k) {
          const T* src = X + (k0 + k) * ld;
          for (int64_t b = 0; b < nb; ++b) {
            double* dst = P + (b * KB + k) * TILE;
            const int64_t m = std::min(TILE, d - b * TILE);
            for (int64_t q = 0; q < m; ++q) dst[q] = static_cast<double>(src[b * TILE + q]);
          }
        }
        for (int64_t i = c_lo; i < c_hi; ++i) {  // this thread's column sums, in row order (deterministic)
          const double* col = P + (i / TILE) * KB * TILE + i % TILE;
          double s = 0.0;
          for (int64_t k = 0; k < kn; ++k) s += col[k * TILE];
          sx[i] += s;
        }
        for (int64_t b = s_lo; b < s_hi; ++b) {
          const int64_t bi = strips[3 * b], blocks = strips[3 * b + 1], bj = strips[3 * b + 2];
          double* Tb = Tt + (b - s_lo) * SB;
          if (blocks == GI)
            block_strip<GI>(Tb, P, kn, bi, bj);
          else if (GI > 2 && blocks == 2)
            block_strip<2>(Tb, P, kn, bi, bj);
          else
            block_strip<1>(Tb, P, kn, bi, bj);
        }
      }
      for (int64_t b = s_lo; b < s_hi; ++b)
        scatter(S, Tt + (b - s_lo) * SB, strips[3 * b + 1], d, strips[3 * b], strips[3 * b + 2]);
    }
    std::free(P);
    std::free(Tt);
  }
  check(!oom, "cov_update: out of memory for a " + std::to_string(panel * 8) + "-byte panel and " +
                  std::to_string(n_strips * SB * 8) + " bytes of strip sums");
}

}  // namespace

void cov_update(uintptr_t sum_x, uintptr_t sum_xxT, uintptr_t x, int64_t n, int64_t d, int64_t ld,
                int64_t elem_bytes) {
  check(sum_x != 0, "cov_update: sum_x must be non-null");
  check(sum_xxT != 0, "cov_update: sum_xxT must be non-null");
  check(d >= 0 && n >= 0, "cov_update: d and n must be >= 0, got d=" + std::to_string(d) + " n=" + std::to_string(n));
  check(elem_bytes == 4 || elem_bytes == 8,
        "cov_update: elem_bytes must be 4 (float32) or 8 (float64), got " + std::to_string(elem_bytes));
  if (d == 0 || n == 0) return;
  check(x != 0, "cov_update: x must be non-null");
  check(ld >= d, "cov_update: ld must be >= d, got ld=" + std::to_string(ld) + " d=" + std::to_string(d));
  double* sx = reinterpret_cast<double*>(sum_x);
  double* S = reinterpret_cast<double*>(sum_xxT);
  if (elem_bytes == 4)
    cov_rows(sx, S, reinterpret_cast<const float*>(x), n, d, ld);
  else
    cov_rows(sx, S, reinterpret_cast<const double*>(x), n, d, ld);
}

}  // namespace driftscope
