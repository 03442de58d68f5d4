// Skinny GEMM for decode steps: out [M, N] = x [M, K] · wᵀ (w [N, K], the nn.Linear layout) + bias, float32.
// Tensors cross as raw pointers (uintptr_t from tensor.data_ptr()); the launcher guarantees contiguity and dtypes.
#pragma once
#include <cstdint>

namespace driftscope {

// out: [M, N] float32 contiguous (written, not accumulated); x: [M, K] contiguous; w: [N, K] contiguous;
// bias: [N] or 0. Meant for small M (a decode step's sequences): w streams once from memory, x stays in cache.
void small_gemm(uintptr_t out, uintptr_t x, uintptr_t w, uintptr_t bias, int64_t M, int64_t N, int64_t K);

}  // namespace driftscope
