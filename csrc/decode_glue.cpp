// Decode-step glue (see decode_glue.h): single-threaded loops over a decode step's few rows (16 x 576 floats is
// ~37 KB, in L1/L2), each replacing 2-7 torch ops and their dispatch (~10 us apiece at these sizes). Sums of squares
// in 16 float lanes (vectorized without -ffast-math), then the lanes in a fixed order: the same bits on every run.
#include "decode_glue.h"

#include <cmath>
#include <cstring>
#include <string>

#include "common.h"

namespace driftscope {

namespace {

constexpr int64_t kLanes = 16;

float sum_squares(const float* x, int64_t d) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += x[i + l] * x[i + l];
  }
  for (; i < d; ++i) lane[i % kLanes] += x[i] * x[i];
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
  return s;
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
  for (int64_t r = 0; r < rows; ++r) scale_row(out + r * d, x + r * ldx, w, d, eps);
}

void add_rms_norm(uintptr_t res_p, uintptr_t out_p, uintptr_t h_p, uintptr_t a_p, uintptr_t w_p, int64_t rows,
                  int64_t d, double eps) {
  check_rows("add_rms_norm", rows, d);
  float* res = reinterpret_cast<float*>(res_p);
  float* out = reinterpret_cast<float*>(out_p);
  const float* h = reinterpret_cast<const float*>(h_p);
  const float* a = reinterpret_cast<const float*>(a_p);
  const float* w = reinterpret_cast<const float*>(w_p);
  for (int64_t r = 0; r < rows; ++r) {
    float* rr = res + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) rr[i] = h[r * d + i] + a[r * d + i];
    scale_row(out + r * d, rr, w, d, eps);
  }
}

void silu_mul(uintptr_t out_p, uintptr_t gu_p, int64_t rows, int64_t inter) {
  check_rows("silu_mul", rows, inter);
  float* out = reinterpret_cast<float*>(out_p);
  const float* gu = reinterpret_cast<const float*>(gu_p);
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gu + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    // silu(g) = g / (1 + e^-g); e^-g through exp_nonpositive on -|g| (no overflow): for g < 0, e^-g = 1 / e^g
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) {
      const float e = exp_nonpositive(-std::fabs(g[i]));  // e^-|g| in (0, 1]
      const float sig = g[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
      o[i] = (g[i] * sig) * u[i];
    }
  }
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
  for (int64_t t = 0; t < T; ++t) {
    check(slots[t] >= 0 && slots[t] < num_slots, "rope_cache_write: slots[" + std::to_string(t) + "]=" +
                                                     std::to_string(slots[t]) + " outside the cache");
  }
  for (int64_t t = 0; t < T; ++t) {
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
    const int64_t dst = slots[t] * Hkv * D;
    std::memcpy(kc + dst, qkv + (t * H + Hq) * D, sizeof(float) * Hkv * D);
    std::memcpy(vc + dst, qkv + (t * H + Hq + Hkv) * D, sizeof(float) * Hkv * D);
  }
}

}  // namespace driftscope
