"""Decode attention over a paged KV cache: one query token per sequence against its cached context.

`paged_decode_attention(q [B, Hq, D], k_cache/v_cache [S, Hkv, D], gather [B, Lmax], key_mask [B, Lmax], block_tables,
context_lens, block_size, scale, window=None) -> [B, Hq, D]`. The cache is `S = num_blocks · block_size` slots;
sequence b's context is slots `block_tables[b, p // block_size] · block_size + p % block_size` for positions
p < context_lens[b] (the last one is the query token's own key, already written). With a sliding `window` only
positions p >= context_lens[b] - window count (transformers' overlay); the cache keeps the older blocks.
Backends, the table PAGED_ATTENTION: flash-attn's `flash_attn_with_kvcache` (paged, block_table) on fp16/bf16 CUDA
tensors when installed and the block size is a multiple of 256; `driftscope._C.paged_decode_attention` for float32
CPU tensors (reads the blocks in place); otherwise torch: the keys are gathered into [B, Lmax] and SDPA runs once
with a key-padding mask. `paged_decode_attention_torch` is the fp32 reference, same signature.

No Triton kernel here (STYLE.md rule 4): flash-attn, the cpp kernel and SDPA are the fast paths; this file holds the
launcher and the reference. Roofline per layer: reads Σ_b context_b · 2·Hkv·D·elt bytes of cache,
4·Σ_b context_b·Hq·D FLOPs (context_b capped at the window when there is one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import Op

FLASH_PAGE_MULTIPLE = 256  # flash-attn 2 accepts paged caches whose block size is a multiple of 256


def _check(q, k_cache, v_cache, gather, key_mask, block_tables, context_lens) -> None:
    assert q.dim() == 3 and k_cache.dim() == 3, (
        f"q must be [B, Hq, D], caches [S, Hkv, D]; got {q.shape}, {k_cache.shape}")
    assert k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    assert q.shape[2] == k_cache.shape[2] and q.shape[1] % k_cache.shape[1] == 0, (
        f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}")
    B = q.shape[0]
    assert gather.shape[0] == B and key_mask.shape == gather.shape, (
        f"gather {tuple(gather.shape)}, key_mask {tuple(key_mask.shape)}")
    assert block_tables.shape[0] == B and context_lens.shape == (B,), (
        f"block_tables {tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}")
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"


def _select(device: torch.device, dtype: torch.dtype, block_size: int) -> str:
    half = dtype in (torch.float16, torch.bfloat16)
    return PAGED_ATTENTION.select(device, flash_attn=half and block_size % FLASH_PAGE_MULTIPLE == 0,
                                  cpp=dtype == torch.float32)


def use_flash_paged(device: torch.device, dtype: torch.dtype, block_size: int) -> bool:
    """Whether `paged_decode_attention` takes flash-attn's paged kernel for these caches."""
    return _select(device, dtype, block_size) == "flash_attn"


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D] the query of each sequence's newest token
    k_cache: torch.Tensor,  # [S, Hkv, D] all slots of this layer
    v_cache: torch.Tensor,  # [S, Hkv, D]
    gather: torch.Tensor,  # [B, Lmax] int64 slot of each context position; beyond the context, any written slot
    key_mask: torch.Tensor,  # [B, Lmax] bool, True for p < context_lens[b]
    block_tables: torch.Tensor,  # [B, M] int32 block ids (flash-attn path)
    context_lens: torch.Tensor,  # [B] int32, context length including the query token
    block_size: int,
    scale: float,
    window: int | None = None,  # sliding window: positions p >= context_lens[b] - window; None = all
) -> torch.Tensor:  # [B, Hq, D], q.dtype
    _check(q, k_cache, v_cache, gather, key_mask, block_tables, context_lens)
    assert window is None or window > 0, f"window={window}"
    return PAGED_ATTENTION.impls[_select(q.device, q.dtype, block_size)](
        q, k_cache, v_cache, gather, key_mask, block_tables, context_lens, block_size, scale, window)


def _flash_paged(q, k_cache, v_cache, gather, key_mask, block_tables, context_lens, block_size, scale, window):
    from flash_attn import flash_attn_with_kvcache

    paged = (k_cache.shape[0] // block_size, block_size, *k_cache.shape[1:])  # [blocks, block_size, Hkv, D]
    o = flash_attn_with_kvcache(
        q[:, None], k_cache.view(paged), v_cache.view(paged),
        cache_seqlens=context_lens, block_table=block_tables, softmax_scale=scale, causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
    )  # [B, 1, Hq, D]
    return o[:, 0]


def _cpp_paged(q, k_cache, v_cache, gather, key_mask, block_tables, context_lens, block_size, scale, window):
    from driftscope import _C

    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    out = torch.empty(B, Hq, D, dtype=torch.float32)
    # q's sequences may be rows of a wider tensor (q|k|v): read in place when its heads are packed
    qc = q if q.stride(2) == 1 and q.stride(1) == D else q.contiguous()
    kc, vc = k_cache.contiguous(), v_cache.contiguous()
    bt, ctx = block_tables.to(torch.int32).contiguous(), context_lens.to(torch.int32).contiguous()
    _C.paged_decode_attention(out.data_ptr(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), bt.data_ptr(),
                              ctx.data_ptr(), B, bt.shape[1], Hq, Hkv, D, block_size, kc.shape[0], scale, window or 0,
                              qc.stride(0) if B > 1 else Hq * D)
    return out


def _sdpa_paged(q, k_cache, v_cache, gather, key_mask, block_tables, context_lens, block_size, scale, window):
    if window is not None:  # [B, Lmax]: within the context and the window
        p = torch.arange(key_mask.shape[1], device=key_mask.device)
        key_mask = key_mask & (p[None, :] >= (context_lens.to(key_mask.device).long() - window)[:, None])
    k = k_cache[gather].transpose(1, 2)  # [B, Hkv, Lmax, D]
    v = v_cache[gather].transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=key_mask[:, None, None, :], scale=scale, enable_gqa=k.shape[1] != q.shape[1],
    )  # [B, Hq, 1, D]
    return o[:, :, 0]


PAGED_ATTENTION = Op("paged_attention", {"flash_attn": _flash_paged, "cpp": _cpp_paged, "torch": _sdpa_paged},
                     takes={"flash_attn": f"fp16/bf16 and a block size multiple of {FLASH_PAGE_MULTIPLE}",
                            "cpp": "float32"}, strict=False)


def paged_decode_attention_torch(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [S, Hkv, D]
    v_cache: torch.Tensor,  # [S, Hkv, D]
    gather: torch.Tensor,  # [B, Lmax] (unused: the reference walks the block table itself)
    key_mask: torch.Tensor,  # [B, Lmax]
    block_tables: torch.Tensor,  # [B, M] int32
    context_lens: torch.Tensor,  # [B] int32
    block_size: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [B, Hq, D], q.dtype
    """Reference: per sequence, the slots of positions max(0, context - window)..context-1 from the block table,
    fp32 softmax(q·kᵀ)·v."""
    _check(q, k_cache, v_cache, gather, key_mask, block_tables, context_lens)
    B, Hq, D = q.shape
    groups = Hq // k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(context_lens[b])
        pos = torch.arange(0 if window is None else max(0, n - window), n, device=q.device)
        slots = block_tables[b].long()[pos // block_size] * block_size + pos % block_size  # [n]
        k = k_cache[slots].float().repeat_interleave(groups, dim=1)  # [n, Hq, D]; query head h uses kv head h // groups
        v = v_cache[slots].float().repeat_interleave(groups, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # [Hq, n]
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v).to(q.dtype)
    return out
