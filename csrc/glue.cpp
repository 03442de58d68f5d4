// Row-wise glue between the GEMMs (see glue.h). A decode step's few rows (16 x 576 floats, ~37 KB) run inline on the
// caller: each call replaces 2-7 torch ops and their dispatch (~10 us apiece there). A prefill's thousands of rows go
// in chunks of 64 rows over OpenMP's threads; one pass over memory where torch makes 3-5. Each row is computed by one
// thread in a fixed order (sums of squares in 16 double lanes, vectorized without -ffast-math, then the lanes in
// order): the same bits for any thread count or batch composition.
#include "glue.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "common.h"

namespace driftscope {

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 64;  // rows a task

// f(r0, r1) over [0, rows) in chunks of kChunk rows: inline for one chunk (a decode step), else OpenMP's threads,
// those of the GEMMs before and after it (the decode pool's worker would spin beside them after its last task)
template <class F>
void over_rows(int64_t rows, F&& f) {
  const int64_t n = (rows + kChunk - 1) / kChunk;
  if (n <= 1) {
    f(int64_t{0}, rows);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n; ++t) f(t * kChunk, std::min(rows, (t + 1) * kChunk));
}

// Σ x², in double lanes (float32 squares are exact in double): the norm's one reduction
float sum_squares(const float* x, int64_t d) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += static_cast<double>(x[i + l]) * x[i + l];
  }
  for (; i < d; ++i) lane[i % kLanes] += static_cast<double>(x[i]) * x[i];
  double s = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  return static_cast<float>(s);
}

// out = x · rstd · w, in the torch reference's order: (x · rstd) rounded, then · w
void scale_row(float* out, const float* x, const float* w, int64_t d, double eps) {
  const float ms = sum_squares(x, d) / static_cast<float>(d);
  const float rstd = 1.0f / std::sqrt(ms + static_cast<float>(eps));
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = (x[i] * rstd) * w[i];
}

void check_rows(const char* name, int64_t rows, int64_t d) {
  check(rows >= 0 && d > 0, std::string(name) + ": bad sizes rows=" + std::to_string(rows) + " d=" + std::to_string(d));
}

}  // namespace

void rms_norm(uintptr_t out_p, uintptr_t x_p, uintptr_t w_p, int64_t rows, int64_t d, int64_t ldx, double eps) {
  check_rows("rms_norm", rows, d);
  check(ldx >= d, "rms_norm: ldx=" + std::to_string(ldx) + " < d=" + std::to_string(d));
  float* out = reinterpret_cast<float*>(out_p);
  const float* x = reinterpret_cast<const float*>(x_p);
  const float* w = reinterpret_cast<const float*>(w_p);
  over_rows(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) scale_row(out + r * d, x + r * ldx, w, d, eps);
  });
}

void add_rms_norm(uintptr_t res_p, uintptr_t out_p, uintptr_t h_p, uintptr_t a_p, uintptr_t w_p, int64_t rows,
                  int64_t d, double eps) {
  check_rows("add_rms_norm", rows, d);
  float* res = reinterpret_cast<float*>(res_p);
  float* out = reinterpret_cast<float*>(out_p);
  const float* h = reinterpret_cast<const float*>(h_p);
  const float* a = reinterpret_cast<const float*>(a_p);
  const float* w = reinterpret_cast<const float*>(w_p);
  over_rows(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* rr = res + r * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) rr[i] = h[r * d + i] + a[r * d + i];
      scale_row(out + r * d, rr, w, d, eps);
    }
  });
}

void silu_mul(uintptr_t out_p, uintptr_t gu_p, int64_t rows, int64_t inter) {
  check_rows("silu_mul", rows, inter);
  float* out = reinterpret_cast<float*>(out_p);
  const float* gu = reinterpret_cast<const float*>(gu_p);
  over_rows(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gu + r * 2 * inter;
      const float* u = g + inter;
      float* o = out + r * inter;
      // silu(g) = g · sigmoid(g), sigmoid from e^-|g| in (0, 1] (exp_nonpositive: no overflow for either sign)
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float e = exp_nonpositive(-std::fabs(g[i]));
        const float sig = g[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        o[i] = (g[i] * sig) * u[i];
      }
    }
  });
}

void rope_cache_write(uintptr_t qkv_p, uintptr_t cos_p, uintptr_t sin_p, uintptr_t k_p, uintptr_t v_p,
                      uintptr_t slots_p, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t R,
                      int64_t num_slots) {
  check(T >= 0 && Hq > 0 && Hkv > 0 && D > 0 && R >= 0 && 2 * R <= D,
        "rope_cache_write: bad sizes T=" + std::to_string(T) + " Hq=" + std::to_string(Hq) + " Hkv=" +
            std::to_string(Hkv) + " D=" + std::to_string(D) + " R=" + std::to_string(R));
  float* qkv = reinterpret_cast<float*>(qkv_p);
  const float* cs = reinterpret_cast<const float*>(cos_p);
  const float* sn = reinterpret_cast<const float*>(sin_p);
  float* kc = reinterpret_cast<float*>(k_p);
  float* vc = reinterpret_cast<float*>(v_p);
  const int64_t* slots = reinterpret_cast<const int64_t*>(slots_p);
  const int64_t H = Hq + 2 * Hkv;
  for (int64_t t = 0; kc != nullptr && t < T; ++t) {
    check(slots[t] >= 0 && slots[t] < num_slots, "rope_cache_write: slots[" + std::to_string(t) + "]=" +
                                                     std::to_string(slots[t]) + " outside the cache");
  }
  over_rows(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cs + t * R;
      const float* s = sn + t * R;
      for (int64_t h = 0; h < Hq + Hkv; ++h) {  // q heads, then k heads
        float* x1 = qkv + (t * H + h) * D;
        float* x2 = x1 + R;
#pragma omp simd
        for (int64_t i = 0; i < R; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
      if (kc == nullptr) continue;  // rope only (a prefill's keys go to the cache elsewhere, or nowhere)
      const int64_t dst = slots[t] * Hkv * D;
      std::memcpy(kc + dst, qkv + (t * H + Hq) * D, sizeof(float) * Hkv * D);
      std::memcpy(vc + dst, qkv + (t * H + Hq + Hkv) * D, sizeof(float) * Hkv * D);
    }
  });
}

}  // namespace driftscope
