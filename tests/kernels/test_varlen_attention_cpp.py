"""The cpp prefill attention (driftscope._C.varlen_attention) against varlen_attention_torch, the fp32 masked-softmax
reference: causal and windowed, GQA / MQA / MHA, sequences shorter and longer than a work item (32 positions) and a
key block (32 keys), strided views of a fused qkv projection, large scores (the online softmax's rescaling)."""
from __future__ import annotations

import pytest
import torch

from driftscope.kernels import use_backend
from driftscope.kernels.attention import ATTENTION, cpp_admits, varlen_attention, varlen_attention_torch

_C = pytest.importorskip("driftscope._C")

# (lengths, Hq, Hkv, D)
SHAPES = [
    ([7, 1, 13, 4], 4, 2, 16),
    ([100, 0, 33, 1, 64], 9, 3, 64),
    ([65], 6, 1, 32),
    ([31, 32, 33], 4, 4, 64),
    ([70, 3], 8, 2, 128),
    ([200, 57], 9, 3, 64),
]


def _inputs(lengths, hq, hkv, d, seed=0, spread=2.0, packed=True):
    g = torch.Generator().manual_seed(seed + sum(lengths))
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = spread * torch.randn(T, hq + 2 * hkv, d, generator=g)
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    if not packed:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v, cu, max(lengths)


def _err(out, ref) -> float:
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("window", [None, 1, 5, 40])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{'-'.join(map(str, s[0]))}-H{s[1]}-kv{s[2]}-D{s[3]}")
def test_cpp_matches_reference(shape, window):
    q, k, v, cu, maxlen = _inputs(*shape)
    assert cpp_admits(q, k, v)
    scale = shape[3] ** -0.5
    with use_backend("cpp"):
        assert ATTENTION.select(q.device, cpp=True) == "cpp"
        out = varlen_attention(q, k, v, cu, maxlen, scale, window)
    ref = varlen_attention_torch(q, k, v, cu, maxlen, scale, window)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert _err(out, ref) < 2e-6, _err(out, ref)


@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_cpp_large_scores_rescale_exactly(spread):
    """Scores in the hundreds or thousands: every new block maximum rescales the running sums (e^(m_old - m_new)
    underflows to 0 for the large spread); the result must still be the softmax of the reference."""
    q, k, v, cu, maxlen = _inputs([150, 40], 9, 3, 64, seed=3, spread=spread)
    with use_backend("cpp"):
        out = varlen_attention(q, k, v, cu, maxlen, 0.125)
    ref = varlen_attention_torch(q.double(), k.double(), v.double(), cu, maxlen, 0.125).float()
    assert torch.isfinite(out).all() and _err(out, ref) < 2e-5, _err(out, ref)


def test_cpp_packed_and_contiguous_inputs_give_the_same_bits():
    shape = ([90, 17], 9, 3, 64)
    packed = _inputs(*shape)
    contiguous = _inputs(*shape, packed=False)
    with use_backend("cpp"):
        a = varlen_attention(*packed[:4], packed[4], 0.125)
        b = varlen_attention(*contiguous[:4], contiguous[4], 0.125)
    assert torch.equal(a, b)


def test_cpp_takes_only_float32_with_a_lane_multiple_head_dim():
    lanes = _C.varlen_attention_lanes()
    q, k, v, _, _ = _inputs([5], 2, 2, lanes * 2)
    assert cpp_admits(q, k, v)
    assert not cpp_admits(q.double(), k.double(), v.double())
    q, k, v, _, _ = _inputs([5], 2, 2, lanes + 4 if lanes > 4 else 6)
    assert not cpp_admits(q, k, v)


def test_cpp_bits_do_not_depend_on_the_thread_count():
    """Each output row is computed by one thread in a fixed order: 1 and 3 OpenMP threads give the same bits."""
    import hashlib
    import os
    import subprocess
    import sys

    child = ("import hashlib, torch; from driftscope.kernels import use_backend; "
             "from driftscope.kernels.attention import varlen_attention; "
             "g = torch.Generator().manual_seed(5); qkv = torch.randn(300, 15, 64, generator=g); "
             "cu = torch.tensor([0, 7, 150, 151, 300], dtype=torch.int32)\n"
             "with use_backend('cpp'):\n"
             "    o = varlen_attention(qkv[:, :9], qkv[:, 9:12], qkv[:, 12:], cu, 149, 0.125, 40)\n"
             "print(hashlib.sha256(o.numpy().tobytes()).hexdigest())")
    digests = {n: subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True, timeout=120,
                                 env={**os.environ, "OMP_NUM_THREADS": str(n)}).stdout.strip() for n in (1, 3)}
    assert len(set(digests.values())) == 1 and len(digests[1]) == len(hashlib.sha256().hexdigest()), digests
