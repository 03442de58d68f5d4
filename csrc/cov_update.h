// Streaming covariance statistics for driftscope.kernels.cov_update: Σx and Σxxᵀ in float64.
// Tensors cross as raw pointers (uintptr_t from tensor.data_ptr()); the launcher guarantees dtypes.
#pragma once
#include <cstdint>

namespace driftscope {

// sum_x [d] += Σ_k xT[:, k];  sum_xxT [d, d] += xT xTᵀ (both float64, contiguous).
// xT: [d, n] float64 contiguous (the launcher transposes and upcasts x [n, d] once).
void cov_update(uintptr_t sum_x, uintptr_t sum_xxT, uintptr_t xT, int64_t d, int64_t n);

}  // namespace driftscope
