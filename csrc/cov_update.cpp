// Streaming covariance statistics in float64 (see cov_update.h). x [n, d] is read row by row in its own dtype
// (float32 or float64): KB rows at a time are packed into a float64 panel [KB, dp] (dp: d rounded up to TILE and to
// 64 bytes, zero-padded); then every TILE x TILE block (bi, bj), bj >= bi, of the upper triangle accumulates the
// panel's rows as rank-1 updates in registers (a TILE-wide vector times TILE broadcast elements: the GEMM
// micro-kernel shape, compute-bound), is added into S[bi, bj] and mirrored into S[bj, bi]. A diagonal block keeps
// its upper triangle and mirrors it, so S stays exactly symmetric. One OpenMP region: each thread packs its own
// panel (590 KB at d = 576: stays in L2) and owns a fixed share of the blocks and column sums. Every sum is taken in
// row order by one thread, so the result does not depend on the thread count.
// Measured (d = 576, n = 7,042 float32 rows, 2 threads, loaded 2-core Xeon): 0.07 s against 0.29 s for torch's
// upcast + float64 GEMM, which does the d² products where this does d²/2.
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
constexpr int64_t TILE = 8;  // one float64 vector: 8 accumulators + the row vector + a broadcast fit 32 registers
#else
constexpr int64_t TILE = 4;  // AVX2: 16 registers; 8-wide tiles spill (measured 5x slower)
#endif
constexpr int64_t KB = 128;  // rows per panel
typedef double vec __attribute__((vector_size(TILE * sizeof(double))));  // GCC/Clang vector extension

template <typename T>
void cov_rows(double* sx, double* S, const T* X, int64_t n, int64_t d, int64_t ld) {
  const int64_t nb = (d + TILE - 1) / TILE;
  const int64_t dp = (nb * TILE + 7) / 8 * 8;  // panel row stride: whole 64-byte lines, so vector loads stay aligned
  std::vector<int64_t> blocks;  // (bi, bj) of the upper triangle, bi-major
  blocks.reserve(static_cast<size_t>(nb * (nb + 1)));
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = bi; bj < nb; ++bj) blocks.insert(blocks.end(), {bi, bj});
  const int64_t n_blocks = static_cast<int64_t>(blocks.size()) / 2;
  bool oom = false;

  // One parallel region, no barrier inside: each thread packs its own panel and owns a fixed share of the blocks
  // and of the column sums, so a thread the OS deschedules delays only its own share (a barrier per panel made
  // every thread wait for it, 64 times per call on a loaded machine).
#pragma omp parallel
  {
    int64_t t = 0, nt = 1;
#ifdef DRIFTSCOPE_OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    const int64_t b_lo = n_blocks * t / nt, b_hi = n_blocks * (t + 1) / nt;
    const int64_t c_lo = d * t / nt, c_hi = d * (t + 1) / nt;
    double* P = static_cast<double*>(std::aligned_alloc(64, static_cast<size_t>(KB * dp) * sizeof(double)));
    if (P == nullptr) {
#pragma omp atomic write
      oom = true;
    } else {
      std::fill(P, P + KB * dp, 0.0);  // padding columns stay 0
      for (int64_t k0 = 0; k0 < n; k0 += KB) {
        const int64_t kn = std::min(KB, n - k0);
        for (int64_t k = 0; k < kn; ++k) {
          const T* src = X + (k0 + k) * ld;
          double* dst = P + k * dp;
          for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<double>(src[i]);
        }
        for (int64_t i = c_lo; i < c_hi; ++i) {  // this thread's column sums, in row order (deterministic)
          double s = 0.0;
          for (int64_t k = 0; k < kn; ++k) s += P[k * dp + i];
          sx[i] += s;
        }
        for (int64_t b = b_lo; b < b_hi; ++b) {
          const int64_t i0 = blocks[2 * b] * TILE, j0 = blocks[2 * b + 1] * TILE;
          vec acc[TILE] = {};  // acc[q][p] = Σ_k P[k, i0 + p] · P[k, j0 + q]
          for (int64_t k = 0; k < kn; ++k) {
            const double* row = P + k * dp;
            vec xi;
            std::memcpy(&xi, row + i0, sizeof(vec));
            for (int64_t q = 0; q < TILE; ++q) acc[q] += xi * row[j0 + q];
          }
          const int64_t pn = std::min(TILE, d - i0), qn = std::min(TILE, d - j0);
          for (int64_t p = 0; p < pn; ++p) {
            for (int64_t q = i0 == j0 ? p : 0; q < qn; ++q) {
              const double v = acc[q][p];
              S[(i0 + p) * d + j0 + q] += v;
              if (i0 + p != j0 + q) S[(j0 + q) * d + i0 + p] += v;  // mirror: only this block writes (j, i)
            }
          }
        }
      }
      std::free(P);
    }
  }
  check(!oom, "cov_update: out of memory for a " + std::to_string(KB * dp * 8) + "-byte panel per thread");
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
