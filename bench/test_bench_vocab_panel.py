"""Vocab probe on CUDA at the paper's shape (N = 16384, d = 5120, V = 151,936, bf16): the panel path vs the fused
Triton kernel vs the floor, the two bf16 cuBLAS GEMMs with fp32 output. Skipped without CUDA.

- `gemm_floor` (baseline): torch.mm(h, wᵀ, out_dtype=float32) for both models, full [N, V] fp32 outputs.
- `gemm_panels`: the same GEMMs in the panel path's rows into its two reused buffers, no fold (the tight floor:
  panel / gemm_panels is the cost of the fold alone).
- `panel`, `fused`: vocab_probe on the triton backend, DRIFTSCOPE_VOCAB_PATH forcing the path.
CUDA-event medians; each records cuda_event_ms, ratio_to_floor = t / t(gemm_floor), GEMM TFLOP/s (4·N·V·d / t),
tokens/s and the device. Predicted (`triton_panel.vocab_path`): panel ≈ 1.1× the floor, fused 3–5×.
"""
from __future__ import annotations

import pytest
import torch

from test_bench_vocab_probe import V, _cuda_event_ms, make_inputs

N, D = 16384, 5120
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")]


def gemm_floor(hb, wb, ht, wt, y):
    return torch.mm(hb, wb.T, out_dtype=torch.float32), torch.mm(ht, wt.T, out_dtype=torch.float32)


def gemm_panels(hb, wb, ht, wt, y):
    from driftscope.kernels.vocab_probe.triton_panel import vocab_path

    rows = vocab_path(hb.device, hb.shape[0], wb.shape[0]).rows
    zb, zt = (torch.empty(rows, wb.shape[0], dtype=torch.float32, device=hb.device) for _ in range(2))
    for r0 in range(0, hb.shape[0], rows):
        r1 = min(hb.shape[0], r0 + rows)
        torch.mm(hb[r0:r1], wb.T, out_dtype=torch.float32, out=zb[: r1 - r0])
        torch.mm(ht[r0:r1], wt.T, out_dtype=torch.float32, out=zt[: r1 - r0])


def probe(hb, wb, ht, wt, y):
    from driftscope.kernels import use_backend, vocab_probe

    with use_backend("triton"):
        return vocab_probe(hb, wb, ht, wt, y)


WORKLOADS = {"gemm_floor": gemm_floor, "gemm_panels": gemm_panels, "panel": probe, "fused": probe}


@pytest.fixture(scope="module")
def gpu_inputs():
    return make_inputs(N, D, V, dtype=torch.bfloat16, device="cuda")


@pytest.fixture(scope="module")
def floor_ms(gpu_inputs):
    return _cuda_event_ms(gemm_floor, gpu_inputs)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_vocab_panel_gpu(benchmark, gpu_inputs, floor_ms, name, monkeypatch):
    from driftscope.kernels.vocab_probe.triton_panel import vocab_path

    if name in ("panel", "fused"):
        monkeypatch.setenv("DRIFTSCOPE_VOCAB_PATH", name)
    fn = WORKLOADS[name]
    benchmark.group = f"vocab-panel-gpu-N{N}-d{D}-V{V}-bf16"
    benchmark.extra_info["role"] = "baseline" if name == "gemm_floor" else "variant"
    ms = _cuda_event_ms(fn, gpu_inputs)
    benchmark.extra_info["cuda_event_ms"] = ms
    benchmark.extra_info["ratio_to_floor"] = ms / floor_ms
    benchmark.extra_info["gemm_tflops"] = 4 * N * V * D / (ms / 1e3) / 1e12
    benchmark.extra_info["tokens_per_s"] = N / (ms / 1e3)
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0)
    benchmark.extra_info["vocab_path"] = vocab_path("cuda", N, V).reason

    def run():
        fn(*gpu_inputs)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
