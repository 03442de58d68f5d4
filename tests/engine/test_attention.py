"""varlen_attention (SDPA / flash-attn) against varlen_attention_torch, the fp32 masked-softmax reference."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_close

from driftscope.kernels._dispatch import flash_attn_status
from driftscope.kernels.attention import varlen_attention, varlen_attention_torch

# (lengths, Hq, Hkv, D): odd lengths, a length-1 sequence, an empty sequence, GQA, MQA, MHA
SHAPES = [
    ([7, 1, 13, 4], 4, 2, 16),
    ([1], 2, 2, 8),
    ([33], 6, 1, 32),
    ([5, 0, 3], 4, 4, 24),
    ([2, 17, 1, 1, 9], 8, 2, 64),
]
# max|Δ|/max|ref| against the fp32 reference. Measured: fp32 ≤ 1.4e-6; bf16 ≤ 2.9e-3, which is exactly the
# rounding of the output to bf16 (the reference itself, run on the bf16 inputs and rounded once, scores the same).
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 6e-3}


def _ids(shape) -> str:
    lengths, hq, hkv, d = shape
    return f"L{'-'.join(map(str, lengths))}-H{hq}-kv{hkv}-D{d}"


def _inputs(lengths, hq, hkv, d, dtype, device="cpu", packed_qkv=True):
    gen = torch.Generator().manual_seed(sum(lengths) * 31 + hq)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    # as the model produces them: strided views into one fused [T, Hq + 2·Hkv, D] projection
    qkv = (2.0 * torch.randn(T, hq + 2 * hkv, d, generator=gen)).to(device, dtype)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    if not packed_qkv:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_sdpa_matches_reference(shape, dtype):
    q, k, v, cu, maxlen = _inputs(*shape, dtype)
    scale = shape[3] ** -0.5
    out = varlen_attention(q, k, v, cu, maxlen, scale)
    ref = varlen_attention_torch(q.float(), k.float(), v.float(), cu, maxlen, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out.float(), ref, DTYPES[dtype], f"{_ids(shape)} {dtype}")


@pytest.mark.parametrize("shape", SHAPES[:2], ids=_ids)
def test_reference_against_float64(shape):
    q, k, v, cu, maxlen = _inputs(*shape, torch.float32, packed_qkv=False)
    scale = shape[3] ** -0.5
    ref32 = varlen_attention_torch(q, k, v, cu, maxlen, scale)
    ref64 = varlen_attention_torch(q.double(), k.double(), v.double(), cu, maxlen, scale)
    assert_close(ref32, ref64, 1e-6, "fp32 reference vs fp64")


def test_reference_is_causal_and_sequence_local():
    """Changing a later token or another sequence never changes earlier outputs of this sequence."""
    q, k, v, cu, maxlen = _inputs([6, 5], 2, 1, 8, torch.float32, packed_qkv=False)
    base = varlen_attention_torch(q, k, v, cu, maxlen, 0.3)
    k2, v2 = k.clone(), v.clone()
    k2[3:6] += 1.0
    v2[3:6] -= 1.0  # later tokens of sequence 0
    k2[6:] *= 3.0  # all of sequence 1 ...
    moved = varlen_attention_torch(q, k2, v2, cu, maxlen, 0.3)
    assert torch.equal(moved[:3], base[:3])
    assert not torch.equal(moved[6:], base[6:])  # ... changes sequence 1 only
    assert torch.allclose(base[0], v[0].repeat_interleave(2, 0))  # the first token attends to itself only


@pytest.mark.gpu
@pytest.mark.skipif(not flash_attn_status(), reason="flash-attn is not importable on this machine")
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_flash_attn_matches_reference(shape):
    q, k, v, cu, maxlen = _inputs(*shape, torch.bfloat16, device="cuda")
    scale = shape[3] ** -0.5
    out = varlen_attention(q, k, v, cu, maxlen, scale)
    ref = varlen_attention_torch(q.float(), k.float(), v.float(), cu, maxlen, scale)
    assert_close(out.float(), ref, DTYPES[torch.bfloat16], _ids(shape))
