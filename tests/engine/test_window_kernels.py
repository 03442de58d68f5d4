"""Sliding-window attention kernels: varlen_attention (banded SDPA over query blocks) and paged_decode_attention
(cpp kernel, gathered SDPA) with a window against their references, and the references against an independent
per-sequence banded softmax. The window keeps keys q - window < k <= q (transformers' sliding_window_overlay)."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_close
from test_attention import DTYPES, _inputs
from test_paged_attention import _case

from driftscope.kernels import attention
from driftscope.kernels._dispatch import flash_attn_status, use_backend
from driftscope.kernels.attention import varlen_attention, varlen_attention_torch
from driftscope.kernels.paged_attention import paged_decode_attention, paged_decode_attention_torch

# (lengths, Hq, Hkv, D, window, query block): windows shorter than, equal to and longer than sequences; window 1
VARLEN = [
    ([13, 1, 7, 20], 4, 2, 16, 5, 4),
    ([9, 0, 3], 4, 4, 24, 3, 2),
    ([33], 6, 1, 32, 8, 1024),
    ([6, 6], 2, 2, 8, 6, 4),
    ([10], 2, 1, 8, 1, 3),
]
# (context lengths, Hq, Hkv, D, block size, window)
PAGED = [
    ([1, 7, 13], 4, 2, 16, 4, 5),
    ([5], 2, 2, 8, 1, 1),
    ([33, 2], 6, 1, 32, 16, 17),
    ([9, 16, 17, 1], 8, 2, 64, 8, 16),
]


def _vid(s) -> str:
    return f"L{'-'.join(map(str, s[0]))}-H{s[1]}-kv{s[2]}-D{s[3]}-w{s[4]}-blk{s[5]}"


def _pid(s) -> str:
    return f"ctx{'-'.join(map(str, s[0]))}-H{s[1]}-kv{s[2]}-D{s[3]}-bs{s[4]}-w{s[5]}"


def _banded(q, k, v, scale, window):  # one sequence [L, H, D], fp32: row i softmax over keys max(0, i-w+1)..i
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(q.shape[0]):
        j0 = max(0, i - window + 1)
        kk = k[j0:i + 1].float().repeat_interleave(groups, dim=1)  # [n, Hq, D]
        vv = v[j0:i + 1].float().repeat_interleave(groups, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), kk) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", p, vv)
    return out


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", VARLEN, ids=_vid)
def test_windowed_varlen_matches_the_reference(shape, dtype, monkeypatch):
    lengths, hq, hkv, d, window, block = shape
    monkeypatch.setattr(attention, "WINDOW_BLOCK", block)
    q, k, v, cu, max_len = _inputs(lengths, hq, hkv, d, dtype)
    ref = varlen_attention_torch(q, k, v, cu, max_len, d**-0.5, window)
    out = varlen_attention(q, k, v, cu, max_len, d**-0.5, window)
    assert_close(out, ref, DTYPES[dtype], f"windowed varlen {_vid(shape)} {dtype}")
    if window < max_len:  # the window really changes something
        full = varlen_attention_torch(q, k, v, cu, max_len, d**-0.5)
        assert (full.float() - ref.float()).abs().max() > 1e-3


@pytest.mark.parametrize("shape", VARLEN, ids=_vid)
def test_windowed_reference_is_a_banded_softmax(shape):
    lengths, hq, hkv, d, window, _ = shape
    q, k, v, cu, max_len = _inputs(lengths, hq, hkv, d, torch.float32)
    ref = varlen_attention_torch(q, k, v, cu, max_len, d**-0.5, window)
    for s, e in zip(cu.tolist()[:-1], cu.tolist()[1:]):
        if e > s:
            assert_close(ref[s:e], _banded(q[s:e], k[s:e], v[s:e], d**-0.5, window), 1e-6, f"sequence {s}:{e}")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", PAGED, ids=_pid)
def test_windowed_paged_decode_matches_the_reference(shape, dtype, backend):
    *case, window = shape
    args, ks, vs = _case(*case, dtype)
    ref = paged_decode_attention_torch(*args, window)
    with use_backend(backend):
        out = paged_decode_attention(*args, window)
    assert torch.isfinite(out).all(), "a NaN slot was read"
    assert_close(out, ref, DTYPES[dtype], f"windowed paged decode {_pid(shape)} {dtype}")
    if dtype == torch.float32:  # the reference is the last row of banded attention over the whole context
        for b, (k, v) in enumerate(zip(ks, vs)):
            qs = torch.cat([torch.zeros(k.shape[0] - 1, *args[0].shape[1:]), args[0][b:b + 1]])
            assert_close(ref[b], _banded(qs, k, v, args[-1], window)[-1], 1e-6, f"sequence {b}")


@pytest.mark.gpu
def test_windowed_flash_kernels_on_cuda():
    status = flash_attn_status()
    if not status:
        pytest.skip(f"flash-attn is not usable here: {status.reason}")
    q, k, v, cu, max_len = _inputs([300, 1, 77], 8, 2, 64, torch.bfloat16, device="cuda")
    ref = varlen_attention_torch(q, k, v, cu, max_len, 0.125, 64)
    assert_close(varlen_attention(q, k, v, cu, max_len, 0.125, 64), ref, DTYPES[torch.bfloat16], "flash varlen")
    args, _, _ = _case([1, 300, 513], 8, 2, 64, 256, torch.bfloat16)
    cuda = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    out = paged_decode_attention(*cuda, 100).cpu()
    assert_close(out, paged_decode_attention_torch(*args, 100), DTYPES[torch.bfloat16], "flash paged")
