// The row-wise work between a layer's GEMMs, float32, one call each instead of a chain of torch ops (see
// driftscope/kernels/glue.py, which holds the torch references and checks the arguments). Tensors cross as raw
// pointers (uintptr_t from tensor.data_ptr()).
#pragma once
#include <cstdint>

namespace driftscope {

// out [rows, d] (contiguous) = x[r] · 1/sqrt(mean(x[r]²) + eps) · w, x rows `ldx` floats apart.
void rms_norm(uintptr_t out, uintptr_t x, uintptr_t w, int64_t rows, int64_t d, int64_t ldx, double eps);

// res [rows, d] = h + a, then out [rows, d] = rms_norm(res) (the residual add and the next norm in one pass);
// all contiguous.
void add_rms_norm(uintptr_t res, uintptr_t out, uintptr_t h, uintptr_t a, uintptr_t w, int64_t rows, int64_t d,
                  double eps);

// out [rows, inter] (contiguous) = silu(gu[:, :inter]) · gu[:, inter:], gu [rows, 2·inter] contiguous.
void silu_mul(uintptr_t out, uintptr_t gu, int64_t rows, int64_t inter);

// qkv [T, Hq + 2·Hkv, D] (contiguous): rotate the first 2·R dims of the q and k heads in place (rotate-half:
// (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin), cos/sin [T, R] contiguous), then copy token t's k and v heads
// into slot slots[t] of k_cache / v_cache [num_slots, Hkv, D]; k_cache = 0: rope only (slots, v_cache unused).
void rope_cache_write(uintptr_t qkv, uintptr_t cos, uintptr_t sin, uintptr_t k_cache, uintptr_t v_cache,
                      uintptr_t slots, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t R, int64_t num_slots);

}  // namespace driftscope
