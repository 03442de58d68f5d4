"""cov_update at the paper's hidden size on a GPU: the bf16 tensor-core path (fp32 partials over TC_ROWS rows folded
into float64) against the float64 tl.dot path on the same data upcast to fp32 (the baseline: what every hidden state
paid before), 4,096 tokens × d = 5120. Skipped without CUDA.
On the CPU, at SmolLM2-135M's hidden size and the real drift's scored tokens (3,860 × 576 float32): the cpp kernel
(the d²/2 products of the upper triangle) against torch's float64 upcast + GEMM (`cov_update_torch`, the baseline)."""
from __future__ import annotations

import pytest
import torch

from driftscope.kernels._dispatch import cpp_status

gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")]
N, D = 4096, 5120
CPU_N, CPU_D = 3860, 576


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_cov_update_cpu(benchmark, impl):
    from driftscope.kernels import cov_update, use_backend

    if impl == "cpp" and not cpp_status("cpu"):
        pytest.skip("driftscope._C is not built")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CPU_N, CPU_D, generator=g) * 2 + 0.5
    sx, sxx = torch.zeros(CPU_D, dtype=torch.float64), torch.zeros(CPU_D, CPU_D, dtype=torch.float64)

    def run():
        with use_backend(impl):
            cov_update(sx, sxx, x)

    benchmark.group = f"cov-update-cpu-N{CPU_N}-d{CPU_D}"
    benchmark.extra_info["role"] = "baseline" if impl == "torch" else "variant"
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gflops_upper"] = CPU_N * CPU_D * CPU_D / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("path", ["float64_dot", "tensor_cores"])
@pytest.mark.parametrize("_gpu", [pytest.param(None, marks=gpu)], ids=[""])
def test_cov_update_gpu(benchmark, path, _gpu):
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
