// Decode attention over a paged KV cache, float32 (see driftscope/kernels/paged_attention.py).
// Tensors cross as raw pointers (uintptr_t from tensor.data_ptr()); the launcher guarantees contiguity and dtypes.
#pragma once
#include <cstdint>

namespace driftscope {

// out, q: [B, Hq, D]; k_cache, v_cache: [S, Hkv, D] (S = blocks · block_size slots); block_tables: [B, M] int32;
// context_lens: [B] int32 (1 <= context_lens[b] <= M · block_size). Query head h reads kv head h / (Hq / Hkv).
// window > 0: only positions >= context_lens[b] - window count (sliding-window attention); 0: the whole context.
// ldq: floats between two sequences' queries (q [B, Hq, D] rows of a wider [B, ldq] tensor, e.g. q|k|v); 0: Hq·D.
void paged_decode_attention(uintptr_t out, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables,
                            uintptr_t context_lens, int64_t B, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t block_size, int64_t num_slots, double scale, int64_t window = 0,
                            int64_t ldq = 0);

}  // namespace driftscope
