"""One decoder layer for a pure decode step on float32 CPU tensors: `Block.forward` in ~10 calls instead of ~35.

A decode step's layer moves a few rows (one per running sequence) through four skinny GEMMs and paged attention;
the rest, ~30 torch ops of ~1 us of work and ~10 us of dispatch each, cost a third of the step (bench/RESULTS.md,
the decode profile). Here they are the `kernels/glue.py` calls: the norm, rope with the cache writes, the
residual add with the next norm, silu·up, and attention reads q in place from q|k|v. Same arithmetic as
`Block.forward` (the reference: tests/engine/test_decode_layer.py compares the two and whole generations), to
float32 rounding.

`takes(block, h, batch)` says when it applies: a KV step whose tokens are all decode tokens, float32 CPU, no LoRA
side path, the cpp backend chosen for linear and paged attention (a forced torch backend keeps the torch ops).
"""
from __future__ import annotations

import torch

from driftscope.engine.layer_batch import LayerBatch
from driftscope.kernels.glue import add_rms_norm, rms_norm, rope_cache_write_, silu_mul
from driftscope.kernels.linear import LINEAR, SMALL_M
from driftscope.kernels.paged_attention import PAGED_ATTENTION

_gemm, _attention = LINEAR.impls["cpp"], PAGED_ATTENTION.impls["cpp"]  # the cpp backends, as `takes` requires


def takes(block, h: torch.Tensor, batch: LayerBatch) -> bool:
    kv = batch.kv
    return (kv is not None and kv.n_decode == h.shape[0] <= SMALL_M and h.dtype == torch.float32
            and h.device.type == "cpu" and batch.masks is None and batch.shared is None
            and block.attn.lora is None and block.mlp.lora is None
            and LINEAR.select(h.device, cpp=True) == "cpp" and PAGED_ATTENTION.select(h.device) == "cpp")


def decode_block(block, h: torch.Tensor, batch: LayerBatch) -> torch.Tensor:
    """[T, d] -> new [T, d], as `Block.forward(h, batch)` for a step `takes` admits (h is not modified)."""
    attn, mlp, kv = block.attn, block.mlp, batch.kv
    T = h.shape[0]
    hq, hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    x = rms_norm(h, block.attn_norm.weight, block.attn_norm.eps)
    qkv = _gemm(x, attn.wqkv.weight, attn.wqkv.bias, None).view(T, hq + 2 * hkv, D)
    if attn.q_norm is not None:
        _norm_heads_(qkv[:, :hq], attn.q_norm.weight, attn.eps)
        _norm_heads_(qkv[:, hq : hq + hkv], attn.k_norm.weight, attn.eps)
    kc, vc = kv.k[attn.layer_idx], kv.v[attn.layer_idx]
    rope_cache_write_(qkv, batch.cos, batch.sin, kc, vc, kv.slot_mapping, hq, hkv)
    o = _attention(qkv[:, :hq], kc, vc, kv.gather, kv.key_mask, kv.block_tables, kv.context_lens, kv.block_size,
                   attn.scale, attn.window)  # [T, Hq, D], q read in place from q|k|v
    a = _gemm(o.view(T, hq * D), attn.wo.weight, attn.wo.bias, None)
    r, x = add_rms_norm(h, a, block.mlp_norm.weight, block.mlp_norm.eps)
    g = silu_mul(_gemm(x, mlp.w_gate_up.weight, mlp.w_gate_up.bias, None))
    return r.add_(_gemm(g, mlp.w_down.weight, mlp.w_down.bias, None))


def _norm_heads_(x: torch.Tensor, w: torch.Tensor, eps: float) -> None:  # x [T, H, D] view of q|k|v, in place
    T, H, D = x.shape
    x.copy_(rms_norm(x.reshape(T * H, D), w, eps).view(T, H, D))
