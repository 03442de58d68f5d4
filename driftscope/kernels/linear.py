"""`linear(x, weight, bias=None)` = x·weightᵀ + bias, with a skinny-GEMM kernel for decode steps on the CPU.

A decode step multiplies a handful of rows (one per running sequence) by every weight matrix. MKL's float32 GEMM
is slow for few rows on the CPUs measured here (bench/RESULTS.md: 4–6 ms for [16, 768]·[768, 4096], the time of
~100 rows), so float32 inputs of ≤ SMALL_M rows go through the cpp backend, `driftscope._C.small_gemm` (AVX-512 or
AVX2 dot products on the weight's own [N, K] layout; from 8 rows on AVX2 and 12 on AVX-512, x transposed so each
weight element is broadcast once against 16 rows; its own thread pool over N, csrc/thread_pool.h), which streams
each weight once: the op's own rule in the table
LINEAR. Larger inputs and other devices or dtypes take torch's GEMMs: `F.linear` (MKL, cuBLAS), or on CPUs where
MKL leaves AVX-512 unused, torch's oneDNN GEMM (`cpu_gemm`, below).
`linear_torch` is the float64 reference, same signature.

`cpu_gemm` (also the cpp vocab probe's GEMM): MKL runs its AVX2 kernels on non-Intel CPUs, so on an AVX-512 CPU of
another vendor float32 GEMMs go through oneDNN (`torch.ops.mkldnn._linear_pointwise`, in every x86 torch build),
whose AVX-512 kernels run there: on a Zen 4 host, [256, 576]·[576, 16384] at 197 GFLOP/s against MKL's 135, the
forward's q|k|v, o and down projections 1.14-1.26x (bench/RESULTS.md). Its output is a new tensor, so an output larger
than glibc's reuse limit (32 MiB: fresh pages, faulted in on every call) stays with MKL writing into `out`, unless
the caller splits its rows (`row_block`: the MLP's gate|up, 1.2x in blocks of 2,048 rows).
DRIFTSCOPE_CPU_GEMM=mkl|onednn forces one (auto: the rule above).

No Triton kernel (STYLE.md rule 4): on CUDA cuBLAS is the kernel. Roofline: 2·M·N·K FLOPs, N·K·4 bytes of weight
(memory-bound below M ≈ 30 on a 2-core AVX2 machine).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from driftscope.kernels._dispatch import Op

SMALL_M = 128  # measured crossover vs MKL at [M, 768]·[768, 4096]: ~192 rows (bench/RESULTS.md); a margin below
FRESH_BYTES = 32 << 20  # glibc's largest mmap threshold: bigger blocks are mapped afresh (page faults) on each use
CPU_GEMMS = ("auto", "mkl", "onednn")


@functools.cache
def _vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("vendor_id")), "")
    except OSError:
        return ""


def onednn_gemm() -> bool:
    """Whether CPU float32 GEMMs go through oneDNN: DRIFTSCOPE_CPU_GEMM, else an AVX-512 CPU not made by Intel."""
    how = os.environ.get("DRIFTSCOPE_CPU_GEMM", "auto").strip() or "auto"
    if how not in CPU_GEMMS:
        raise ValueError(f"DRIFTSCOPE_CPU_GEMM={how!r}: expected one of {', '.join(CPU_GEMMS)}")
    if how == "onednn" and not _onednn_present():
        raise ValueError("DRIFTSCOPE_CPU_GEMM=onednn: this torch build has no oneDNN GEMM "
                         "(torch.ops.mkldnn._linear_pointwise); use mkl or auto")
    return how == "onednn" or (how == "auto" and _auto())


@functools.cache
def _onednn_present() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def _auto() -> bool:
    return (_onednn_present() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and _vendor() not in ("", "GenuineIntel"))


def row_block(x: torch.Tensor, n_cols: int) -> int | None:
    """Rows per call that keep a [rows, n_cols] float32 output of `x`'s GEMM within FRESH_BYTES when it runs on
    oneDNN (which returns its own output: larger ones are mapped afresh per call), else None (no need to split)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or not onednn_gemm():
        return None
    rows = max(1, FRESH_BYTES // (4 * n_cols))
    return rows if rows < x.shape[0] else None


def cpu_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] · weight [N, K]ᵀ (+ bias) -> a new [M, N] float32 tensor on the CPU, by oneDNN where `onednn_gemm()`,
    else by MKL (F.linear). The same call on the same shapes gives the same bits."""
    if onednn_gemm():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (or [..., K] through F.linear), weight [N, K], bias [N] -> [M, N] in x's dtype, written into `out`
    (contiguous [M, N], 2-D x only; reused memory, kernels/scratch.py, or in tests NaN-filled to show unwritten
    elements) when given, except by oneDNN (`cpu_gemm`), which returns its own: use the returned tensor."""
    small = x.dtype == weight.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= SMALL_M
    return LINEAR.impls[LINEAR.select(x.device, cpp=small)](x, weight, bias, out)


def _small_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None):
    from driftscope import _C

    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape == (N, K), f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    assert bias is None or (bias.shape == (N,) and bias.dtype == torch.float32), (
        f"bias {None if bias is None else bias.shape}")
    x = x.contiguous()
    weight = weight.contiguous()
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    assert out.shape == (M, N) and out.dtype == torch.float32 and out.is_contiguous(), f"out {tuple(out.shape)}"
    b = 0 if bias is None else bias.contiguous().data_ptr()
    _C.small_gemm(out.data_ptr(), x.data_ptr(), weight.data_ptr(), b, M, N, K)
    return out


def _torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None):
    if (x.device.type == "cpu" and x.dim() == 2 and x.dtype == weight.dtype == torch.float32 and onednn_gemm()
            and (out is None or x.shape[0] * weight.shape[0] * 4 <= FRESH_BYTES)):
        return cpu_gemm(x, weight, bias)  # its own output: `out` unused
    if out is None:
        return F.linear(x, weight, bias)
    assert x.dim() == 2 and out.shape == (x.shape[0], weight.shape[0]), f"out {tuple(out.shape)} for x {tuple(x.shape)}"
    # F.linear's own 2-D calls (mm, or addmm with the bias), into `out`: the same BLAS call, the same bits
    return torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias, x, weight.T, out=out)


LINEAR = Op("linear", {"cpp": _small_gemm, "torch": _torch_linear},
            takes={"cpp": f"float32 x [M, K] with M <= {SMALL_M} rows"}, strict=False)


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: float64 matmul, cast back."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
