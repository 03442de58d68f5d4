"""One decode step's CPU kernels at SmolLM2-135M-Instruct's shapes (float32, 16 sequences, issue [13]): the weight
GEMMs of 30 layers plus the tied head through `driftscope._C.small_gemm` vs torch F.linear, and paged decode
attention of 30 layers (cpp kernel vs gathered SDPA). Each layer has its own tensors, so weights and caches stream
from memory as in a real step. Throughput = bytes read / median time: weights N·K·4 per GEMM (538 MB a step);
K/V Σ_b context_b · 2·Hkv·D·4 per layer.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import cpp_status, use_backend
from driftscope.kernels.paged_attention import paged_decode_attention

pytestmark = pytest.mark.skipif(not cpp_status("cpu"), reason="driftscope._C is not built")
LAYERS, HIDDEN, INTER, VOCAB = 30, 576, 1536, 49152
HQ, HKV, D, BLOCK = 9, 3, 64, 16
# [N, K] of one layer's weights: qkv, o, gate|up, down
LAYER_SHAPES = [((HQ + 2 * HKV) * D, HIDDEN), (HIDDEN, HQ * D), (2 * INTER, HIDDEN), (HIDDEN, INTER)]


@pytest.fixture(scope="module")
def step_weights():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) for _ in range(LAYERS) for n, k in LAYER_SHAPES]
    return ws + [torch.randn(VOCAB, HIDDEN, generator=g)]  # the tied head last


def _gemm_step(weights, m, small: bool):
    from driftscope import _C

    xs = {k: torch.randn(m, k) for k in (HIDDEN, INTER)}
    outs = [torch.empty(m, w.shape[0]) for w in weights]
    if small:
        return lambda: [_C.small_gemm(o.data_ptr(), xs[w.shape[1]].data_ptr(), w.data_ptr(), 0, m, *w.shape)
                        for w, o in zip(weights, outs)]
    return lambda: [F.linear(xs[w.shape[1]], w) for w in weights]


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("impl", ["mkl", "small_gemm"])
def test_decode_step_gemms(benchmark, step_weights, m, impl):
    nbytes = sum(w.numel() * 4 for w in step_weights)
    benchmark.group = f"decode-step-gemms-M{m}"
    benchmark.extra_info.update(role="baseline" if impl == "mkl" else "small_gemm", weight_bytes=nbytes)
    benchmark.pedantic(_gemm_step(step_weights, m, impl == "small_gemm"), rounds=10, warmup_rounds=1, iterations=1)
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.fixture(scope="module")
def caches():
    """30 layers' caches with 16 sequences of 180..230 positions in scattered blocks; the tensors of one call."""
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(180, 231, (16,), generator=g, dtype=torch.int32)
    width = 16  # blocks per sequence: 256 positions
    nb = 16 * width
    bt = torch.randperm(nb, generator=g).to(torch.int32).view(16, width)
    lmax = int(ctx.max())
    p = torch.arange(lmax)
    pc = torch.minimum(p[None, :], (ctx.long() - 1)[:, None])
    gather = bt.long().gather(1, pc // BLOCK) * BLOCK + pc % BLOCK  # [16, Lmax]
    mask = p[None, :] < ctx[:, None]
    layers = [(torch.randn(nb * BLOCK, HKV, D, generator=g), torch.randn(nb * BLOCK, HKV, D, generator=g))
              for _ in range(LAYERS)]
    return torch.randn(16, HQ, D, generator=g), layers, gather, mask, bt, ctx


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_decode_step_attention(benchmark, caches, backend):
    q, layers, gather, mask, bt, ctx = caches
    nbytes = LAYERS * int(ctx.sum()) * 2 * HKV * D * 4
    benchmark.group = "decode-step-attention"
    benchmark.extra_info.update(role="baseline" if backend == "torch" else "cpp", kv_bytes=nbytes)

    def step():
        with use_backend(backend):
            return [paged_decode_attention(q, k, v, gather, mask, bt, ctx, BLOCK, D**-0.5) for k, v in layers]

    benchmark.pedantic(step, rounds=10, warmup_rounds=1, iterations=1)
    benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.median / 1e9
