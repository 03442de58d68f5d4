"""linear: the small-M cpp kernel (driftscope._C.small_gemm) against the float64 reference over a shape table with
odd sizes and every block remainder, NaN-filled outputs, strided inputs and bias; the dispatch rule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import cpp_status, use_backend
import driftscope.kernels.linear as lin
from driftscope.kernels.linear import SMALL_M, cpu_gemm, linear, linear_torch
from kernel_helpers import assert_close_verbose

pytestmark = pytest.mark.skipif(not cpp_status("cpu"), reason="driftscope._C is not built")

# (M, N, K): M and N remainders of the 6 x 2 (AVX2) and 8 x 3 (AVX-512) blocks, K tails of the 8- and 16-wide
# vectors, the decode shapes (SmolLM2-135M's qkv, down and a slice of its head at 16 sequences); the AVX2 transposed
# path (M >= 8): 12-row blocks at M = 8, 5-row blocks over 16-row chunks with a last chunk of <= 8 rows, N remainders
# of both, K tails of its 4-step loop and of its 64-product chunks, and a long K (the chunk sums bound the rounding);
# the AVX-512 transposed path from 12 rows: its first M (and the one below), zero lanes, N remainders of its 12-row
# blocks, a second chunk of 12 rows
SHAPES = [(1, 1, 1), (1, 4, 8), (2, 5, 9), (3, 7, 15), (4, 6, 16), (5, 3, 7), (16, 2304, 768), (17, 1001, 64),
          (SMALL_M, 96, 40), (7, 4096, 768), (8, 3, 16), (9, 4, 17), (15, 5, 31), (23, 8, 47), (24, 9, 33),
          (16, 960, 576), (16, 576, 1536), (16, 4099, 576), (1, 3072, 576),
          (8, 25, 130), (40, 13, 3), (33, 11, 200), (16, 7, 8192),
          (11, 30, 70), (12, 25, 130), (13, 12, 64), (14, 37, 1536), (28, 24, 17)]
# max |Δ| / (|x|·|w| summed): float32 accumulation of K products, measured ≤ 2e-7 here
TOL = 2e-6


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
def test_small_gemm_matches_float64(M, N, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    out = torch.full((M, N), float("nan"))
    got = linear(x, w, b, out=out)
    assert got.data_ptr() == out.data_ptr(), "the small-M kernel must have run (and written into out)"
    scale = (x.abs().double() @ w.abs().double().T) + (b.abs().double() if bias else 0)  # Σ|x||w|: the rounding scale
    ref = linear_torch(x, w, b)
    err = (got.double() - (x.double() @ w.double().T + (b.double() if bias else 0))).abs() / scale.clamp_min(1e-30)
    assert not got.isnan().any(), "an output element was not written"
    assert float(err.max()) <= TOL, f"max error {float(err.max()):.2e} relative to Σ|x·w|"
    assert_close_verbose(got, ref, atol=1e-4, rtol=1e-4, what=f"M{M}-N{N}-K{K}")


def test_strided_rows_like_the_mlp_gate_view():
    x = torch.randn(6, 64)[:, :32]  # row stride 64, as gu[:, :I] in the MLP
    w = torch.randn(40, 32)
    assert_close_verbose(linear(x, w), linear_torch(x, w), atol=1e-5, rtol=1e-5, what="strided x")


def test_dispatch_falls_back_to_blas_where_the_kernel_does_not_apply():
    w = torch.randn(8, 16)
    big = torch.randn(SMALL_M + 1, 16)
    assert torch.equal(linear(big, w), cpu_gemm(big, w))  # more rows than SMALL_M: torch's GEMM (MKL or oneDNN)
    x64 = torch.randn(3, 16, dtype=torch.float64)
    assert torch.equal(linear(x64, w.double()), F.linear(x64, w.double()))  # not float32
    x = torch.randn(3, 16)
    with use_backend("torch"):
        assert torch.equal(linear(x, w), cpu_gemm(x, w))


@pytest.mark.parametrize("engine", ["mkl", "onednn"])
def test_cpu_gemm_engines_against_float64(engine, monkeypatch):
    """Either engine of torch's CPU GEMM (DRIFTSCOPE_CPU_GEMM), with and without bias, a strided x, into and beside
    `out`: within float32 rounding of the float64 reference; mkl is F.linear bit for bit."""
    if engine == "onednn" and not lin._onednn_present():
        pytest.skip("this torch build has no oneDNN GEMM")
    monkeypatch.setenv("DRIFTSCOPE_CPU_GEMM", engine)
    assert lin.onednn_gemm() == (engine == "onednn")
    g = torch.Generator().manual_seed(3)
    for M, N, K in [(SMALL_M + 1, 40, 64), (300, 257, 96), (1, 5, 7)]:
        x, w, b = torch.randn(M, 2 * K, generator=g)[:, :K], torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        for bias in (None, b):
            with use_backend("torch"):  # M = 1 too: the torch backend's GEMM, not the small-M kernel
                got = linear(x, w, bias, out=torch.full((M, N), float("nan")) if M > SMALL_M else None)
            assert_close_verbose(got, linear_torch(x, w, bias), atol=1e-5, rtol=1e-5, what=f"{engine} M{M}")
            assert torch.equal(got, cpu_gemm(x, w, bias))
            if engine == "mkl":
                assert torch.equal(got, F.linear(x, w, bias))


def test_cpu_gemm_rule(monkeypatch):
    """auto: oneDNN on AVX-512 CPUs not made by Intel (MKL runs AVX2 kernels there), MKL elsewhere; a bad value of
    DRIFTSCOPE_CPU_GEMM is named."""
    monkeypatch.delenv("DRIFTSCOPE_CPU_GEMM", raising=False)
    for vendor, cap, want in [("AuthenticAMD", "AVX512", True), ("GenuineIntel", "AVX512", False),
                              ("AuthenticAMD", "AVX2", False), ("", "AVX512", False)]:
        lin._auto.cache_clear()
        monkeypatch.setattr(lin, "_vendor", lambda v=vendor: v)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=cap: c)
        assert lin.onednn_gemm() == (want and lin._onednn_present()), (vendor, cap)
    lin._auto.cache_clear()
    monkeypatch.setenv("DRIFTSCOPE_CPU_GEMM", "blis")
    with pytest.raises(ValueError, match="DRIFTSCOPE_CPU_GEMM='blis': expected one of auto, mkl, onednn"):
        lin.onednn_gemm()


@pytest.mark.parametrize("M", [4, 16], ids=lambda m: f"M{m}")
def test_long_sums_of_positive_products_stay_within_tolerance(M):
    """Positive products do not cancel, so the rounding of a float32 sum grows with its length: 16,384 of them in one
    FMA chain err by ~3e-6 of Σ|x·w|; the kernels' split sums (vector lanes, 64-product chunks) stay under TOL."""
    g = torch.Generator().manual_seed(7)
    K = 16384
    x, w = torch.rand(M, K, generator=g), torch.rand(8, K, generator=g)
    got = linear(x, w, out=torch.full((M, 8), float("nan")))
    want = x.double() @ w.double().T  # = Σ|x·w| here
    err = float(((got.double() - want).abs() / want).max())
    assert err <= TOL, f"max error {err:.2e} relative to Σ|x·w|"
