"""Causal attention over packed variable-length sequences: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1]
-> [T, Hq, D].

`varlen_attention` uses flash-attn's varlen kernel on CUDA when available, torch SDPA per sequence otherwise;
`varlen_attention_torch` is the obviously-correct fp32 reference (explicit masked softmax), same signature.
`tree_attention` is the same with an explicit boolean mask for some sequences (a shared prefix followed by
branches that see the prefix and themselves only: several continuations of one context in one sequence);
`tree_attention_torch` is its reference.

There is no Triton kernel in this file (STYLE.md rule 4 lists three parts): flash-attn and SDPA already are the
fast kernels, so the file holds the launcher (dispatch + checks) and the reference.
Roofline: 4·Σ_b L_b²·Hq·D/2 FLOPs (causal halves QKᵀ and PV), bytes ≈ (Hq + 2·Hkv)·T·D·elt + Hq·T·D·elt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import flash_attn_status


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, (
        f"q/k/v must be [T, H, D], got {q.shape}, {k.shape}, {v.shape}")
    assert k.shape == v.shape, f"k {tuple(k.shape)} != v {tuple(v.shape)}"
    assert q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2], f"q {tuple(q.shape)} vs k {tuple(k.shape)}"
    assert q.shape[1] % k.shape[1] == 0, f"Hq={q.shape[1]} not a multiple of Hkv={k.shape[1]}"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim must be contiguous"
    assert cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32, (
        f"cu_seqlens must be int32 [B+1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    assert q.dtype == k.dtype == v.dtype, f"dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"


def varlen_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cu_seqlens: torch.Tensor,  # [B+1] int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D], q.dtype
    """Causal attention within each packed sequence (GQA when Hkv < Hq)."""
    _check(q, k, v, cu_seqlens)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_status():
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
        )
    T, Hq, D = q.shape
    gqa = k.shape[1] != Hq
    bounds = cu_seqlens.tolist()  # one host sync per call; B is small
    # 4-D [1, H, L, D] views: CPU SDPA takes its fused flash kernel only for 4-D inputs (3-D falls back to the
    # unfused math path, ~4x slower); strided views of the fused qkv projection are accepted without copies.
    if len(bounds) == 2:  # one sequence: no output copy into a preallocated buffer
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=gqa,
        )  # [1, Hq, T, D]
        return o[0].transpose(0, 1)  # [T, Hq, D] view
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=gqa,
        )  # [1, Hq, L, D]
        out[s:e].copy_(o[0].transpose(0, 1))
    return out


def varlen_attention_torch(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cu_seqlens: torch.Tensor,  # [B+1] int32
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:  # [T, Hq, D], q.dtype
    """Reference: fp32 scores over all T×T pairs, masked to (same sequence) ∧ (key ≤ query), softmax, PV."""
    _check(q, k, v, cu_seqlens)
    T = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    assert int(lengths.max()) <= max_seqlen if T else True, "max_seqlen is smaller than the longest sequence"
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)  # [T] sequence id
    pos = torch.arange(T, device=q.device)
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])  # [T(query), T(key)]
    return _masked_attention(q, k, v, allowed, scale)


def _masked_attention(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 softmax(q·kᵀ·scale) over the `allowed` [T(query), T(key)] pairs, times v (GQA by repetition)."""
    groups = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, T, D]
    kf = k.float().repeat_interleave(groups, dim=1).transpose(0, 1)  # [Hq, T, D]; query head h uses kv head h // groups
    vf = v.float().repeat_interleave(groups, dim=1).transpose(0, 1)  # [Hq, T, D]
    scores = (qf @ kf.transpose(1, 2)) * scale  # [Hq, T, T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # every query sees at least itself: no all -inf rows
    return (probs @ vf).transpose(0, 1).to(q.dtype)  # [T, Hq, D]


def tree_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cu_seqlens: torch.Tensor,  # [B+1] int32
    max_seqlen: int,
    scale: float,
    masks: tuple,  # B × (bool [L_b, L_b], True = the query row may attend to the key column; or None = causal)
) -> torch.Tensor:  # [T, Hq, D], q.dtype
    """Per-sequence attention with an explicit mask where one is given, causal elsewhere (SDPA; GQA)."""
    _check(q, k, v, cu_seqlens)
    bounds = cu_seqlens.tolist()
    assert len(masks) == len(bounds) - 1, f"{len(masks)} masks for {len(bounds) - 1} sequences"
    gqa = k.shape[1] != q.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for (s, e), mask in zip(zip(bounds[:-1], bounds[1:]), masks):
        if e == s:
            continue
        assert mask is None or tuple(mask.shape) == (e - s, e - s), (
            f"mask {tuple(mask.shape)} for a sequence of {e - s}")
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
            attn_mask=None if mask is None else mask.to(q.device), is_causal=mask is None, scale=scale, enable_gqa=gqa,
        )  # [1, Hq, L, D]
        out[s:e].copy_(o[0].transpose(0, 1))
    return out


def tree_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
    masks: tuple,
) -> torch.Tensor:
    """Reference: fp32 scores over all T×T pairs, masked to (same sequence) ∧ (the sequence's mask, or causal)."""
    _check(q, k, v, cu_seqlens)
    T = q.shape[0]
    allowed = torch.zeros(T, T, dtype=torch.bool, device=q.device)
    bounds = cu_seqlens.tolist()
    for (s, e), mask in zip(zip(bounds[:-1], bounds[1:]), masks):
        n = e - s
        allowed[s:e, s:e] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() if mask is None else mask
    return _masked_attention(q, k, v, allowed, scale)
