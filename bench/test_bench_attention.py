"""Prefill attention on the CPU at the drift peers' shape (issue [13]): 32 sequences of 150-256 positions (~7,000
tokens, SmolLM2-135M's 9 query / 3 kv heads, D = 64, float32) in one layer call, as strided views of the fused qkv
projection: the cpp kernel (driftscope._C.varlen_attention) against torch SDPA per sequence (the baseline, the
torch backend of kernels/attention.py). GFLOP/s counts the causal work, 4·Σ L²/2·Hq·D."""
from __future__ import annotations

import pytest
import torch

from driftscope.kernels._dispatch import cpp_status, use_backend
from driftscope.kernels.attention import varlen_attention

pytestmark = pytest.mark.skipif(not cpp_status("cpu"), reason="driftscope._C is not built")
HQ, HKV, D = 9, 3, 64


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(150, 257, (32,), generator=g)
    cu = torch.zeros(33, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    qkv = torch.randn(int(cu[-1]), HQ + 2 * HKV, D, generator=g)
    return qkv[:, :HQ], qkv[:, HQ:HQ + HKV], qkv[:, HQ + HKV:], cu, int(lens.max()), lens


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_prefill_attention(benchmark, batch, impl):
    q, k, v, cu, maxlen, lens = batch
    benchmark.group = "prefill-attention-32x150..256"
    benchmark.extra_info["role"] = "baseline" if impl == "torch" else "cpp"

    def run():
        with use_backend(impl):
            return varlen_attention(q, k, v, cu, maxlen, D ** -0.5)

    benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
    flops = sum(4 * int(n) ** 2 / 2 * HQ * D for n in lens)
    benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9
