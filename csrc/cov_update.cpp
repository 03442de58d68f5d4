// Streaming covariance statistics in float64 (see cov_update.h). Only the upper triangle j >= i is
// computed (d(d+1)/2 dot products of length n) and mirrored; OpenMP over output rows i (dynamic
// schedule: row i has d - i entries), SIMD over the token dimension, 4 output columns per sweep so
// each load of row i feeds four FMAs; the token dimension is blocked to keep rows in L1/L2.
#include "cov_update.h"

#include <algorithm>
#include <string>

#include "common.h"

namespace driftscope {

void cov_update(uintptr_t sum_x, uintptr_t sum_xxT, uintptr_t xT, int64_t d, int64_t n) {
  check(sum_x != 0, "cov_update: sum_x must be non-null");
  check(sum_xxT != 0, "cov_update: sum_xxT must be non-null");
  check(d >= 0 && n >= 0, "cov_update: d and n must be >= 0, got d=" + std::to_string(d) + " n=" + std::to_string(n));
  if (d == 0 || n == 0) return;
  check(xT != 0, "cov_update: xT must be non-null");
  double* sx = reinterpret_cast<double*>(sum_x);
  double* S = reinterpret_cast<double*>(sum_xxT);
  const double* X = reinterpret_cast<const double*>(xT);
  constexpr int64_t kBlock = 512;  // tokens per sweep: 4 KB per row

  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    const int64_t kn = std::min(kBlock, n - k0);
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < d; ++i) {
      const double* xi = X + i * n + k0;
      double si = 0.0;
#pragma omp simd reduction(+ : si)
      for (int64_t k = 0; k < kn; ++k) si += xi[k];
      sx[i] += si;
      int64_t j = i;
      for (; j + 4 <= d; j += 4) {
        const double *x0 = X + j * n + k0, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < kn; ++k) {
          const double v = xi[k];
          a0 += v * x0[k];
          a1 += v * x1[k];
          a2 += v * x2[k];
          a3 += v * x3[k];
        }
        const double acc[4] = {a0, a1, a2, a3};
        for (int64_t q = 0; q < 4; ++q) {
          S[i * d + j + q] += acc[q];
          if (j + q != i) S[(j + q) * d + i] += acc[q];  // mirror: only row i's sweep writes (j>i, i)
        }
      }
      for (; j < d; ++j) {
        const double* xj = X + j * n + k0;
        double a = 0.0;
#pragma omp simd reduction(+ : a)
        for (int64_t k = 0; k < kn; ++k) a += xi[k] * xj[k];
        S[i * d + j] += a;
        if (j != i) S[j * d + i] += a;
      }
    }
  }
}

}  // namespace driftscope
