"""Decode-step GEMMs (CPU, float32): driftscope's small-M kernel vs torch F.linear (MKL) at [M, 768]·[768, 4096]
(the ~100M Qwen3's gate/up projection) for M = 1, 4, 16, 64, 192 rows. Throughput = 2·M·N·K FLOPs / median time.
The weight (12.6 MB) stays in the L3 cache between rounds here; in a decode step the ~440 MB of weights stream
from memory (11.5 GB/s on the reference machine), which bounds a whole step, not this kernel-level ratio.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import cpp_status
from driftscope.kernels.linear import SMALL_M, linear

pytestmark = pytest.mark.skipif(not cpp_status("cpu"), reason="driftscope._C is not built")
N, K = 4096, 768
ROWS = [1, 4, 16, 64, 192]


def _inputs(m: int):
    g = torch.Generator().manual_seed(m)
    return torch.randn(m, K, generator=g), torch.randn(N, K, generator=g)


@pytest.mark.parametrize("m", ROWS)
def test_mkl_linear(benchmark, m):
    x, w = _inputs(m)
    benchmark.group = f"linear-M{m}"
    benchmark.extra_info.update(role="baseline", gflops=2 * m * N * K / 1e9)
    benchmark.pedantic(lambda: F.linear(x, w), rounds=30, warmup_rounds=3, iterations=5)


@pytest.mark.parametrize("m", ROWS)
def test_small_gemm(benchmark, m):
    from driftscope import _C

    x, w = _inputs(m)
    out = torch.empty(m, N)
    benchmark.group = f"linear-M{m}"
    benchmark.extra_info.update(role="small_gemm", gflops=2 * m * N * K / 1e9, dispatched=m <= SMALL_M)
    call = lambda: _C.small_gemm(out.data_ptr(), x.data_ptr(), w.data_ptr(), 0, m, N, K)  # noqa: E731
    benchmark.pedantic(call, rounds=30, warmup_rounds=3, iterations=5)
    assert torch.allclose(out, linear(x, w) if m <= SMALL_M else F.linear(x, w), atol=1e-3, rtol=1e-4)
