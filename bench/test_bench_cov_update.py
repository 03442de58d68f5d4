"""cov_update at the paper's hidden size on a GPU: the bf16 tensor-core path (fp32 partials over TC_ROWS rows folded
into float64) against the float64 tl.dot path on the same data upcast to fp32 (the baseline: what every hidden state
paid before), 4,096 tokens × d = 5120. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")]
N, D = 4096, 5120


@pytest.mark.parametrize("path", ["float64_dot", "tensor_cores"])
def test_cov_update_gpu(benchmark, path):
    from driftscope.kernels import cov_update, use_backend

    x = (torch.randn(N, D, device="cuda") * 3 + 40).to(torch.bfloat16)
    x_in = x if path == "tensor_cores" else x.float()  # the same values: fp32 input takes the float64 dot
    sx = torch.zeros(D, dtype=torch.float64, device="cuda")
    sxx = torch.zeros(D, D, dtype=torch.float64, device="cuda")

    def run():
        with use_backend("triton"):
            cov_update(sx, sxx, x_in)
        torch.cuda.synchronize()

    benchmark.group = f"cov-update-gpu-N{N}-d{D}"
    benchmark.extra_info["role"] = "baseline" if path == "float64_dot" else "variant"
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["tflops"] = N * D * D / benchmark.stats.stats.median / 1e12  # the upper triangle, x2 flops
