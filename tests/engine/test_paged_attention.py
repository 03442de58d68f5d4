"""paged_decode_attention (SDPA over gathered keys / flash-attn's paged kernel) against paged_decode_attention_torch,
and the reference against the last row of full causal attention over the same sequence (an independent check).
Unused cache slots hold NaN: reading one would show."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_close

from driftscope.kernels._dispatch import flash_attn_status, use_backend
from driftscope.kernels.attention import varlen_attention_torch
from driftscope.kernels.paged_attention import paged_decode_attention, paged_decode_attention_torch

# (context lengths, Hq, Hkv, D, block size): a one-token context, odd lengths, GQA / MQA / MHA, block size 1, the
# cpp kernel's compiled head dims (64: SmolLM2's 9 q / 3 kv heads over many blocks; 128) and a run-time one (24)
SHAPES = [
    ([1, 7, 13], 4, 2, 16, 4),
    ([5], 2, 2, 8, 1),
    ([33, 2], 6, 1, 32, 16),
    ([9, 16, 17, 1], 8, 2, 64, 8),
    ([203, 37, 16, 1], 9, 3, 64, 16),
    ([20, 5], 4, 1, 128, 16),
    ([40, 21], 6, 3, 24, 5),
]
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 6e-3}  # as tests/engine/test_attention.py (output rounding in bf16)


def _ids(shape) -> str:
    lens, hq, hkv, d, bs = shape
    return f"ctx{'-'.join(map(str, lens))}-H{hq}-kv{hkv}-D{d}-bs{bs}"


def _case(lens, hq, hkv, d, bs, dtype):
    """A cache with the sequences' blocks scattered in a shuffled order, the rest NaN; per sequence its k/v."""
    gen = torch.Generator().manual_seed(sum(lens) + 7 * hq)
    blocks = [-(-n // bs) for n in lens]
    nb = sum(blocks) + 3  # spare blocks stay NaN
    perm = torch.randperm(nb, generator=gen).tolist()
    tables, i = [], 0
    for b in blocks:
        tables.append(perm[i:i + b])
        i += b
    kc = torch.full((nb * bs, hkv, d), float("nan"), dtype=dtype)
    vc = torch.full((nb * bs, hkv, d), float("nan"), dtype=dtype)
    ks, vs, qs = [], [], []
    for n, table in zip(lens, tables):
        k = (2 * torch.randn(n, hkv, d, generator=gen)).to(dtype)
        v = torch.randn(n, hkv, d, generator=gen).to(dtype)
        pos = torch.arange(n)
        slots = torch.tensor(table)[pos // bs] * bs + pos % bs
        kc[slots], vc[slots] = k, v
        ks.append(k)
        vs.append(v)
        qs.append((2 * torch.randn(hq, d, generator=gen)).to(dtype))
    ctx = torch.tensor(lens)
    width = max(blocks)
    bt = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables])  # [B, M]
    lmax = max(lens)
    p = torch.arange(lmax)
    pc = torch.minimum(p[None, :], (ctx - 1)[:, None])
    gather = bt.gather(1, pc // bs) * bs + pc % bs
    mask = p[None, :] < ctx[:, None]
    args = (torch.stack(qs), kc, vc, gather, mask, bt.int(), ctx.int(), bs, d**-0.5)
    return args, ks, vs


@pytest.mark.parametrize("backend", ["cpp", "torch"])  # cpp: in-place kernel (float32); torch: gathered SDPA
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_paged_decode_attention_matches_the_reference(shape, dtype, backend):
    args, _, _ = _case(*shape, dtype)
    ref = paged_decode_attention_torch(*args)
    with use_backend(backend):
        out = paged_decode_attention(*args)
    assert torch.isfinite(out).all(), "a NaN slot was read"
    assert_close(out, ref, DTYPES[dtype], f"paged decode {_ids(shape)} {dtype}")


@pytest.mark.parametrize("shape", SHAPES[:5], ids=_ids)
def test_cpp_kernel_reads_queries_in_place_from_a_wider_tensor(shape):
    """q as the first heads of a q|k|v tensor (the decode layer's call, engine/decode_layer.py): sequences
    (Hq + 2·Hkv)·D floats apart, read in place, the same result as from a contiguous copy."""
    args, _, _ = _case(*shape, torch.float32)
    q = args[0]
    B, hq, d = q.shape
    hkv = args[1].shape[1]
    wide = torch.full((B, hq + 2 * hkv, d), float("nan"))
    wide[:, :hq] = q
    with use_backend("cpp"):
        out = paged_decode_attention(wide[:, :hq], *args[1:])
        same = paged_decode_attention(q, *args[1:])
    assert torch.isfinite(out).all(), "a k or v head of the wider tensor was read as a query"
    assert torch.equal(out, same)
    assert_close(out, paged_decode_attention_torch(*args), DTYPES[torch.float32], f"strided q {_ids(shape)}")


def test_cpp_kernel_softmax_underflow_matches_the_reference():
    """Scores ~1e3 apart: most probabilities underflow to 0 in float32 (the kernel's exp must give 0 there, not
    garbage) and the survivors decide the output."""
    args, _, _ = _case([70, 33], 9, 3, 64, 16, torch.float32)
    q = args[0] * 300
    args = (q, *args[1:])
    ref = paged_decode_attention_torch(*args)
    with use_backend("cpp"):
        out = paged_decode_attention(*args)
    assert torch.isfinite(out).all(), "a NaN slot was read or exp overflowed"
    assert_close(out, ref, DTYPES[torch.float32], "paged decode with underflowing probabilities")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_reference_is_the_last_row_of_causal_attention(shape):
    args, ks, vs = _case(*shape, torch.float32)
    q = args[0]
    ref = paged_decode_attention_torch(*args)
    for b, (k, v) in enumerate(zip(ks, vs)):
        n = k.shape[0]
        qs = torch.cat([torch.zeros(n - 1, *q.shape[1:]), q[b:b + 1]])  # only the last query row matters
        full = varlen_attention_torch(qs, k, v, torch.tensor([0, n], dtype=torch.int32), n, args[-1])
        assert_close(ref[b], full[-1], 1e-6, f"sequence {b}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [([1, 300, 513], 8, 2, 64, 256)], ids=_ids)
def test_flash_paged_kernel_matches_the_reference_on_cuda(shape):
    status = flash_attn_status()
    if not status:
        pytest.skip(f"flash-attn is not usable here: {status.reason}")
    args, _, _ = _case(*shape, torch.bfloat16)
    cuda = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    out = paged_decode_attention(*cuda).cpu()
    assert_close(out, paged_decode_attention_torch(*args), DTYPES[torch.bfloat16], "flash paged")
