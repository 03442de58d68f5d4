// Streaming covariance statistics for driftscope.kernels.cov_update: Σx and Σxxᵀ in float64.
// Tensors cross as raw pointers (uintptr_t from tensor.data_ptr()); the launcher guarantees dtypes.
#pragma once
#include <cstdint>

namespace driftscope {

// sum_x [d] += Σ_k x[k, :];  sum_xxT [d, d] += xᵀx (both float64, contiguous; sum_xxT stays exactly symmetric).
// x: [n, d] rows of float32 (elem_bytes 4) or float64 (8), row stride ld >= d elements, unit column stride.
void cov_update(uintptr_t sum_x, uintptr_t sum_xxT, uintptr_t x, int64_t n, int64_t d, int64_t ld,
                int64_t elem_bytes);

}  // namespace driftscope
