"""Causal attention over packed variable-length sequences: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1]
-> [T, Hq, D].

`varlen_attention`'s backends, the table ATTENTION: flash-attn's varlen kernel (fp16/bf16 CUDA tensors, when
installed), cpp (`driftscope._C.varlen_attention`: float32 CPU tensors whose head dim is a multiple of the build's
vector lanes; all sequences in one OpenMP call, the causal triangle skipped block-wise, csrc/varlen_attention.cpp),
torch SDPA per sequence otherwise; `varlen_attention_torch` is the obviously-correct fp32 reference (explicit masked
softmax), same signature.
`window` (sliding-window attention, transformers' overlay): query i sees keys i - window < j <= i of its sequence;
flash-attn takes it as window_size=(window - 1, 0), SDPA as banded masks over blocks of WINDOW_BLOCK queries (a
block's keys start window - 1 before it, so no mask is larger than WINDOW_BLOCK × (WINDOW_BLOCK + window - 1)).
`tree_attention` is the same with an explicit boolean mask for some sequences (a shared prefix followed by
branches that see the prefix and themselves only: several continuations of one context in one sequence);
`tree_attention_torch` is its reference.

There is no Triton kernel in this file (STYLE.md rule 4 lists three parts): on CUDA flash-attn and SDPA already are
the fast kernels, so the file holds the launchers (dispatch + checks) and the reference.
Roofline: 4·Σ_b L_b²·Hq·D/2 FLOPs (causal halves QKᵀ and PV; with a window, 4·Σ_b L_b·min(L_b, window)·Hq·D),
bytes ≈ (Hq + 2·Hkv)·T·D·elt + Hq·T·D·elt.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import Op

WINDOW_BLOCK = 1024  # queries per SDPA call when a sliding window cuts a sequence (tests lower it)


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
    window: int | None = None,  # sliding window (keys i - window < j <= i), None = full causal
) -> torch.Tensor:  # [T, Hq, D], q.dtype
    """Causal attention within each packed sequence (GQA when Hkv < Hq), optionally within a sliding window."""
    _check(q, k, v, cu_seqlens)
    assert window is None or window > 0, f"window={window}"
    if window is not None and window >= max_seqlen:
        window = None  # no sequence is longer than the window
    half = q.dtype in (torch.float16, torch.bfloat16)
    backend = ATTENTION.select(q.device, flash_attn=half, cpp=cpp_admits(q, k, v))
    return ATTENTION.impls[backend](q, k, v, cu_seqlens, max_seqlen, scale, window)


@functools.cache
def _lanes() -> int:
    from driftscope import _C

    return _C.varlen_attention_lanes()


def cpp_admits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The cpp kernel's calls: float32 CPU tensors, head dim a multiple of its vector lanes, heads D apart."""
    if q.dtype != torch.float32 or q.device.type != "cpu":
        return False
    D = q.shape[2]
    try:
        lanes = _lanes()
    except ImportError:
        return False
    return D % lanes == 0 and all(t.stride(1) == D for t in (q, k, v))


def _cpp_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float, window: int | None) -> torch.Tensor:
    from driftscope import _C

    T, Hq, D = q.shape
    out = torch.empty(T, Hq, D, dtype=torch.float32)
    cu = cu_seqlens.contiguous()
    assert int(cu[0]) == 0 and int(cu[-1]) == T, f"cu_seqlens must run from 0 to T={T}, got {cu.tolist()}"  # in bounds
    if T:
        _C.varlen_attention(out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cu.data_ptr(), cu.shape[0] - 1,
                            Hq, k.shape[1], D, q.stride(0), k.stride(0), v.stride(0), scale, window or 0)
    return out


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float, window: int | None) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0),
    )


def _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen: int, scale: float, window: int | None) -> torch.Tensor:
    """SDPA per sequence; a sliding window as banded masks over blocks of WINDOW_BLOCK queries."""
    gqa = k.shape[1] != q.shape[1]
    bounds = cu_seqlens.tolist()  # one host sync per call; B is small
    if len(bounds) == 2 and window is None:  # one sequence: no output copy into a preallocated buffer
        return _sdpa(q, k, v, scale, gqa)  # [T, Hq, D] view
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if window is None or e - s <= window:
            if e > s:
                out[s:e].copy_(_sdpa(q[s:e], k[s:e], v[s:e], scale, gqa))
            continue
        for i0 in range(s, e, WINDOW_BLOCK):  # query block [i0, i1) sees keys [j0, i1)
            i1, j0 = min(i0 + WINDOW_BLOCK, e), max(s, i0 - window + 1)
            qi = torch.arange(i0, i1, device=q.device)[:, None]
            kj = torch.arange(j0, i1, device=q.device)[None, :]
            band = (kj <= qi) & (kj > qi - window)  # [i1 - i0, i1 - j0]
            out[i0:i1].copy_(_sdpa(q[i0:i1], k[j0:i1], v[j0:i1], scale, gqa, band))
    return out


ATTENTION = Op("attention", {"flash_attn": _flash_varlen, "cpp": _cpp_varlen, "torch": _sdpa_varlen},
               takes={"flash_attn": "fp16/bf16", "cpp": "float32 with the head dim a multiple of the vector lanes"},
               strict=False)


def _sdpa(q, k, v, scale: float, gqa: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA of one sequence [L, H, D] -> [L, Hq, D] view: causal, or under a bool mask [Lq, Lk] when given.
    4-D [1, H, L, D] views: CPU SDPA takes its fused flash kernel only for 4-D inputs (3-D falls back to the unfused
    math path, ~4x slower); strided views of the fused qkv projection are accepted without copies."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa,
    )  # [1, Hq, L, D]
    return o[0].transpose(0, 1)


def varlen_attention_torch(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    cu_seqlens: torch.Tensor,  # [B+1] int32
    max_seqlen: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [T, Hq, D], q.dtype
    """Reference: fp32 scores over all T×T pairs, masked to (same sequence) ∧ (key ≤ query)
    ∧ (key > query − window), softmax, PV."""
    _check(q, k, v, cu_seqlens)
    T = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    assert int(lengths.max()) <= max_seqlen if T else True, "max_seqlen is smaller than the longest sequence"
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)  # [T] sequence id
    pos = torch.arange(T, device=q.device)
    allowed = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])  # [T(query), T(key)]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
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
        out[s:e].copy_(_sdpa(q[s:e], k[s:e], v[s:e], scale, gqa, None if mask is None else mask.to(q.device)))
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
