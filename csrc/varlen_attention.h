// Causal attention over packed variable-length sequences, float32 (see driftscope/kernels/attention.py).
// Tensors cross as raw pointers (uintptr_t from tensor.data_ptr()); the launcher checks dtypes and strides.
#pragma once
#include <cstdint>

namespace driftscope {

// q: [T, Hq, D] rows sq floats apart (heads D apart, elements contiguous); k, v: [T, Hkv, D] rows sk / sv floats
// apart (views of a fused qkv projection pass as they are); cu_seqlens: [B+1] int32; out: [T, Hq, D] contiguous.
// Query i of a sequence sees its keys j <= i, and with window > 0 only j > i - window. Query head h reads kv head
// h / (Hq / Hkv). D must be a multiple of varlen_attention_lanes().
void varlen_attention(uintptr_t out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_seqlens, int64_t B,
                      int64_t Hq, int64_t Hkv, int64_t D, int64_t sq, int64_t sk, int64_t sv, double scale,
                      int64_t window = 0);

int64_t varlen_attention_lanes();  // the float lanes of one vector in this build

}  // namespace driftscope
