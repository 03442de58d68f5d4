"""cov_update: cpp and triton against the float64 torch reference, on random and large-mean data."""
from __future__ import annotations

import importlib

import pytest
import torch

from driftscope.kernels import use_backend
from kernel_helpers import assert_close_verbose

cu = importlib.import_module("driftscope.kernels.cov_update")
DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
# (n, d, dtype, mean): odd sizes, a single row, large means where fp32 sums of x·xᵀ lose the covariance
CASES = [(1, 5, torch.float32, 0.0), (37, 72, torch.float32, 0.0), (100, 33, torch.bfloat16, 0.0),
         (64, 40, torch.float16, 3.0), (257, 48, torch.float32, 1e4), (33, 17, torch.float64, -1e3)]
IDS = [f"n{n}-d{d}-{DT[dt]}-mean{m:g}" for n, d, dt, m in CASES]


def _data(n, d, dtype, mean):
    g = torch.Generator().manual_seed(n * 1000 + d)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + mean).to(dtype)


def _zeros(d, device="cpu"):
    return torch.zeros(d, dtype=torch.float64, device=device), torch.zeros(d, d, dtype=torch.float64, device=device)


def _cov(sx, sxx, n):
    mu = sx / n
    return sxx / n - torch.outer(mu, mu)


@pytest.mark.parametrize(("n", "d", "dtype", "mean"), CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cov_update_vs_float64(backend, n, d, dtype, mean, triton_device):
    if backend == "cpp":
        pytest.importorskip("driftscope._C")
    x = _data(n, d, dtype, mean)
    want = _zeros(d)
    cu.cov_update_torch(*want, x)
    cu.cov_update_torch(*want, x[: n // 2])  # two updates: accumulation, not overwrite
    dev = triton_device if backend == "triton" else "cpu"
    got = _zeros(d, dev)
    with use_backend(backend):
        cu.cov_update(*got, x.to(dev))
        cu.cov_update(*got, x[: n // 2].to(dev))
    scale = float(want[1].abs().max())
    assert_close_verbose(got[0], want[0], atol=1e-12 * max(1.0, float(want[0].abs().max())), what=f"{backend} sum_x")
    m = n + n // 2
    if backend == "triton" and dtype in (torch.bfloat16, torch.float16):  # tensor cores: the fp32 partials' bound
        _assert_within_tc_bound(got[1], want[1], torch.cat([x, x[: n // 2]]), f"{backend} sum_xxT")
    else:
        assert_close_verbose(got[1], want[1], atol=1e-13 * scale, rtol=1e-13, what=f"{backend} sum_xxT")
        # the covariance recovered from the sums (large-mean data: this is where fp32 fails)
        assert_close_verbose(_cov(*got, m), _cov(*want, m), atol=1e-6, what=f"{backend} covariance")
    assert torch.equal(got[1], got[1].T), "sum_xxT must be exactly symmetric"


def _assert_within_tc_bound(got, want, x, what):
    """|error| ≤ TC_ROWS·2⁻²⁴·Σ_k |x_ki x_kj| elementwise (plus the fp64 folds): each TC_ROWS-row partial sum of
    exact products is rounded in fp32 at most TC_ROWS times, relative to the sum of the magnitudes."""
    a = x.double().abs()
    bound = cu.TC_ROWS * 2.0**-24 * (a.T @ a) + 1e-12 * float(want.abs().max())
    err = (got - want).abs()
    assert bool((err <= bound).all()), f"{what}: max error/bound {float((err / bound).max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_path_on_large_mean_data(dtype, triton_device):
    """Hidden-state-like data (mean 40, spread 3) in bf16/fp16 through the tensor-core path, 4,000 rows: Σxxᵀ within
    the fp32-partial bound of float64, and the covariance recovered from it within 2e-4 of its scale."""
    n, d = 4000, 40
    x = (3 * _data(n, d, torch.float64, 0.0) + 40).to(dtype)
    want = _zeros(d)
    cu.cov_update_torch(*want, x)
    got = _zeros(d, triton_device)
    with use_backend("triton"):
        cu.cov_update(*got, x.to(triton_device))
    got = (got[0].cpu(), got[1].cpu())
    _assert_within_tc_bound(got[1], want[1], x, "tensor-core sum_xxT")
    cov = _cov(*want, n)
    assert_close_verbose(_cov(*got, n), cov, atol=2e-4 * float(cov.abs().max()), what="tensor-core covariance")


def test_naive_fp32_fails_on_large_mean():
    """The reason for float64 accumulation: fp32 Σxxᵀ at mean 1e4 has no covariance left."""
    x = _data(257, 48, torch.float32, 1e4)
    want = _zeros(48)
    cu.cov_update_torch(*want, x)
    naive = (x.T @ x).double(), x.sum(0).double()
    err = (_cov(naive[1], naive[0], 257) - _cov(*want, 257)).abs().max()
    assert err > 1.0, f"fp32 accumulation unexpectedly accurate (err {err})"


def test_cov_update_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"sum_x must be float64 \[3\]"):
        cu.cov_update(torch.zeros(3), torch.zeros(3, 3, dtype=torch.float64), x)
    with pytest.raises(ValueError, match=r"sum_xxT must be float64 \[3, 3\]"):
        cu.cov_update(torch.zeros(3, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64), x)
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        cu.cov_update(*_zeros(3), x[0])
    with pytest.raises(ValueError, match=r"x must be a float tensor"):
        cu.cov_update(*_zeros(3), x.int())


def test_cov_update_empty_is_a_no_op():
    sx, sxx = _zeros(3)
    cu.cov_update(sx, sxx, torch.zeros(0, 3))
    assert not sx.any() and not sxx.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_triton_symmetry_holds_when_the_dot_is_not_symmetric(dtype, monkeypatch):
    """A BLAS (or GPU) may sum xᵢ·xⱼ over k in another order for (i, j) than for (j, i), so xᵀx need not be exactly
    symmetric. Here the interpreter's dot is made order-dependent on purpose: its strict lower triangle is moved one
    ulp up. Σxxᵀ must still be exactly symmetric (a diagonal block keeps its upper triangle and mirrors it), on any
    BLAS, and still within the float64 tolerances."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter's dot is patched; on a GPU the other tests check the real one")
    np = pytest.importorskip("numpy")
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    real_dot = interpreter.InterpreterBuilder.create_dot

    def skewed_dot(self, a, b, d, *args):
        out = real_dot(self, a, b, d, *args)
        data = out.data
        if data.ndim == 2 and data.shape[0] == data.shape[1]:
            low = np.tril(np.ones(data.shape, dtype=bool), -1)
            data = np.where(low, np.nextafter(data, np.inf), data).astype(data.dtype)
        return interpreter.TensorHandle(data, out.dtype)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", skewed_dot)
    n, d = 70, 45  # two diagonal blocks of BLOCK_D = 32, the second one partial
    x = _data(n, d, dtype, 0.5)
    want = _zeros(d)
    cu.cov_update_torch(*want, x)
    got = _zeros(d)
    with use_backend("triton"):
        cu.cov_update(*got, x)
    asym = (got[1] != got[1].T).sum().item()
    assert asym == 0, f"sum_xxT not exactly symmetric: {asym} entries differ from their mirror"
    assert_close_verbose(got[1], want[1], atol=1e-5 * float(want[1].abs().max()), what="skewed-dot sum_xxT")


STRIDED = [(300, 130, torch.float32, 50.0, 7), (129, 8, torch.float64, 0.0, 1), (2, 3, torch.float32, -2.0, 5)]


@pytest.mark.parametrize(("n", "d", "dtype", "mean", "pad"), STRIDED,
                         ids=[f"n{n}-d{d}-{DT[dt]}-pad{p}" for n, d, dt, _, p in STRIDED])
def test_cpp_reads_strided_rows_across_panels(n, d, dtype, mean, pad):
    """The cpp kernel reads x's rows in place (row stride > d: a column slice of a wider tensor) over several
    128-row panels and partial tiles (d not a multiple of the tile): same sums as the float64 reference on a
    contiguous copy, exactly symmetric."""
    pytest.importorskip("driftscope._C")
    wide = _data(n, d + 2 * pad, dtype, mean)
    x = wide[:, pad:pad + d]  # [n, d] view, row stride d + 2·pad
    assert x.stride(0) == d + 2 * pad and not x.is_contiguous()
    want, got = _zeros(d), _zeros(d)
    cu.cov_update_torch(*want, x.contiguous())
    with use_backend("cpp"):
        cu.cov_update(*got, x)
    assert_close_verbose(got[0], want[0], atol=1e-12 * float(want[0].abs().max()), what="sum_x")
    assert_close_verbose(got[1], want[1], atol=1e-13 * float(want[1].abs().max()), rtol=1e-13, what="sum_xxT")
    assert torch.equal(got[1], got[1].T), "sum_xxT must be exactly symmetric"


def test_cpp_checks_name_the_argument():
    _C = pytest.importorskip("driftscope._C")
    sx, sxx = _zeros(3)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="ld must be >= d"):
        _C.cov_update(sx.data_ptr(), sxx.data_ptr(), x.data_ptr(), 4, 3, 2, 4)
    with pytest.raises(ValueError, match="elem_bytes must be 4"):
        _C.cov_update(sx.data_ptr(), sxx.data_ptr(), x.data_ptr(), 4, 3, 3, 2)
    assert not sx.any() and not sxx.any()


@pytest.mark.parametrize("threads", [2, 3], ids=lambda t: f"threads{t}")
def test_cpp_sums_do_not_depend_on_the_thread_count(threads):
    """Each block and column sum is taken in row order by one thread: 1 and N threads give the same bits."""
    pytest.importorskip("driftscope._C")
    x = _data(300, 131, torch.float32, 5.0)
    before = torch.get_num_threads()
    got = []
    try:
        for t in (1, threads):
            torch.set_num_threads(t)
            sums = _zeros(131)
            with use_backend("cpp"):
                cu.cov_update(*sums, x)
            got.append(sums)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
