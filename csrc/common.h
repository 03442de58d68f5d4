// Shared helpers for driftscope's CPU kernels: argument checks that name the offending argument.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef DRIFTSCOPE_OPENMP
#include <omp.h>
#endif

namespace driftscope {

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// e^x for x <= 0 in float32 (Cephes expf: x = n·ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r, times 2^n
// through the exponent bits; ~1 ulp), 0 below -87.34 where expf leaves the normal range. Plain branch-free
// arithmetic, so `omp simd` loops over it vectorize (libm's expf is a call per element). x is clamped before the
// integer conversion, so -inf (a masked score) gives 0 without an out-of-range cast.
inline float exp_nonpositive(float x) {
  const float lo = -87.33654f;
  const float xc = x < lo ? lo : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);  // round(x / ln2)
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n·ln2, ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : e * scale;
}

// f(std::integral_constant<int64_t, DC>{}) with DC = D for the head dims compiled as constants (64, 128), else DC = 0
// (the kernel reads D at run time): the attention kernels' one dispatch on the head dim.
template <class F>
void with_head_dim(int64_t D, F&& f) {
  if (D == 64) {
    f(std::integral_constant<int64_t, 64>{});
  } else if (D == 128) {
    f(std::integral_constant<int64_t, 128>{});
  } else {
    f(std::integral_constant<int64_t, 0>{});
  }
}

inline int max_threads() {
#ifdef DRIFTSCOPE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace driftscope
