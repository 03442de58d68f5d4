"""Streaming covariance statistics of hidden states: Σx and Σxxᵀ accumulated in float64, in place.

Contract: `cov_update(sum_x, sum_xxT, x)` adds x's column sums to sum_x [d] and xᵀx to sum_xxT [d, d]
(both float64, same device as x, updated in place and returned); x: [n, d] float32/bfloat16/float16/
float64. Mean and covariance follow at finalize: μ = Σx/N, C = Σxxᵀ/N − μμᵀ (done in float64, so the
large-mean data of real hidden states, where fp32 sums lose the covariance, stay exact enough).
A function on two plain tensors rather than a class: the probes' accumulators own the tensors and
merge them by addition. Backends, the table COV_UPDATE: `triton` (upper-triangle blocks mirrored; float32/float64
x: fp64 tl.dot; bfloat16/float16 x: tensor-core tl.dot with fp32 accumulation over TC_ROWS rows, folded into the
fp64 block sums, see `_cov_update_kernel`), `cpp` (driftscope._C.cov_update: x's rows read in place,
float64 register tiles over the d×d upper triangle, one OpenMP region), `torch`.
"""
from __future__ import annotations

import torch

from driftscope.kernels._dispatch import Op
from driftscope.kernels._triton import tl, triton, triton_interpreter

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

if triton is not None:

    @triton.jit
    def _cov_update_kernel(
        x_ptr,  # [n, d] any float dtype, row stride stride_x, unit column stride
        sx_ptr,  # [d] float64, updated in place
        s_ptr,  # [d, d] float64 contiguous, updated in place
        n,
        d,
        stride_x,
        BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
        TENSOR_CORES: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Program (bi, bj), bj ≥ bi: S[I, J] += Σ_k x[k, I]ᵀ x[k, J]; off-diagonal blocks are also written
        transposed to S[J, I] (symmetry: each of the d²/2 block products is computed once); a diagonal block keeps its
        upper triangle and mirrors it, so S stays exactly symmetric on any GPU or BLAS. Diagonal programs
        also add Σ_k x[k, I] to sx[I]. TENSOR_CORES (bf16/fp16 x): products of 8- or 11-bit mantissas are exact in
        fp32, so each BLOCK_K-row tl.dot accumulates in fp32 (error ≤ BLOCK_K·2⁻²⁴·Σ|x_i x_j|) and is folded into
        the fp64 block sum at once; otherwise float64 loads and a float64 tl.dot."""
        bi = tl.program_id(0)
        bj = tl.program_id(1)
        if bj >= bi:
            ci = bi * BLOCK_D + tl.arange(0, BLOCK_D)
            cj = bj * BLOCK_D + tl.arange(0, BLOCK_D)
            mi = ci < d
            mj = cj < d
            acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float64)
            for k0 in range(0, n, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mk = k < n
                row = k.to(tl.int64)[:, None] * stride_x
                xi = tl.load(x_ptr + row + ci[None, :], mask=mk[:, None] & mi[None, :], other=0.0)
                xj = tl.load(x_ptr + row + cj[None, :], mask=mk[:, None] & mj[None, :], other=0.0)
                if TENSOR_CORES:
                    if UPCAST:  # the interpreter's numpy tl.dot gets bf16 wrong; fp32 operands: the same exact products
                        xi, xj = xi.to(tl.float32), xj.to(tl.float32)
                    acc += tl.dot(tl.trans(xi), xj, out_dtype=tl.float32, input_precision="ieee").to(tl.float64)
                else:
                    acc = tl.dot(tl.trans(xi.to(tl.float64)), xj.to(tl.float64), acc, out_dtype=tl.float64)
            if bj == bi:  # symmetric by construction: the upper triangle mirrored, whatever order the dot summed in
                r = tl.arange(0, BLOCK_D)
                acc = tl.where(r[:, None] <= r[None, :], acc, tl.trans(acc))
            m = mi[:, None] & mj[None, :]
            p = s_ptr + ci.to(tl.int64)[:, None] * d + cj[None, :]
            tl.store(p, tl.load(p, mask=m, other=0.0) + acc, mask=m)
            if bj > bi:
                pt = s_ptr + cj.to(tl.int64)[None, :] * d + ci[:, None]  # S[J, I] = S[I, J]ᵀ
                tl.store(pt, tl.load(pt, mask=m, other=0.0) + acc, mask=m)
            else:  # Σ_k x[k, I] in a pass of its own, diagonal programs only: inside the k-loop above, all nb(nb+1)/2
                # programs would load x[:, I] into registers again, convert, reduce and add it in fp64 (for bf16 x,
                # sm_90: 278 instructions per iteration with it, 145 without; bench/aot_resources.py)
                colsum = tl.zeros([BLOCK_D], dtype=tl.float64)
                for k0 in range(0, n, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    xi = tl.load(x_ptr + k.to(tl.int64)[:, None] * stride_x + ci[None, :],
                                 mask=(k < n)[:, None] & mi[None, :], other=0.0)
                    colsum += tl.sum(xi.to(tl.float64), 0)
                tl.store(sx_ptr + ci, tl.load(sx_ptr + ci, mask=mi, other=0.0) + colsum, mask=mi)


def _check(sum_x, sum_xxT, x) -> None:
    for name, t in (("sum_x", sum_x), ("sum_xxT", sum_xxT), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [n, d], got shape {tuple(x.shape)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be a float tensor (float32/bfloat16/float16/float64), got {x.dtype}")
    d = x.shape[1]
    if sum_x.shape != (d,) or sum_x.dtype != torch.float64:
        raise ValueError(f"sum_x must be float64 [{d}], got {sum_x.dtype} {tuple(sum_x.shape)}")
    if sum_xxT.shape != (d, d) or sum_xxT.dtype != torch.float64:
        raise ValueError(f"sum_xxT must be float64 [{d}, {d}], got {sum_xxT.dtype} {tuple(sum_xxT.shape)}")
    if not (sum_x.is_contiguous() and sum_xxT.is_contiguous()):
        raise ValueError("sum_x and sum_xxT must be contiguous (they are updated in place)")
    for name, t in (("sum_x", sum_x), ("sum_xxT", sum_xxT)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def cov_update(sum_x: torch.Tensor, sum_xxT: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: sum_x += Σ_rows x, sum_xxT += xᵀx (float64). Returns (sum_x, sum_xxT)."""
    _check(sum_x, sum_xxT, x)
    if x.shape[0] == 0 or x.shape[1] == 0:
        return sum_x, sum_xxT
    COV_UPDATE.impls[COV_UPDATE.select(x.device)](sum_x, sum_xxT, x)
    return sum_x, sum_xxT


def batch_gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_rows x, xᵀx) of one batch, float64 on x's device: `cov_update` into zeros. Probes that keep the same base
    sums (HiddenSimilarity's CKA and StreamingPCA) add one batch_gram each, so it is computed once and shared."""
    d = x.shape[1]
    return cov_update(torch.zeros(d, dtype=torch.float64, device=x.device),
                      torch.zeros(d, d, dtype=torch.float64, device=x.device), x)


TC_ROWS = 64  # rows per fp32 tensor-core partial sum (bf16/fp16 x), then folded into float64
BLOCK_D = 32  # the launch configuration (Triton's default num_warps), read by tests/kernels/test_triton_compile.py
FP64_ROWS = 32  # BLOCK_K of float32/float64 x (the float64 tl.dot)


def _cov_update_triton(sum_x, sum_xxT, x, block_d: int = BLOCK_D, block_k: int | None = None) -> None:
    xc = x if x.stride(1) == 1 else x.contiguous()
    n, d = xc.shape
    nb = triton.cdiv(d, block_d)
    tc = xc.dtype in (torch.bfloat16, torch.float16)
    up = tc and triton_interpreter() and xc.device.type == "cpu"
    _cov_update_kernel[(nb, nb)](xc, sum_x, sum_xxT, n, d, xc.stride(0), BLOCK_D=block_d,
                                 BLOCK_K=block_k or (TC_ROWS if tc else FP64_ROWS), TENSOR_CORES=tc, UPCAST=up)


def _cov_update_cpp(sum_x, sum_xxT, x) -> None:
    from driftscope import _C

    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)  # bf16/fp16 values are exact in float32
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    n, d = x.shape  # rows read in place (row stride x.stride(0)), upcast to float64 panel by panel
    _C.cov_update(sum_x.data_ptr(), sum_xxT.data_ptr(), x.data_ptr(), n, d, x.stride(0), x.element_size())


def cov_update_torch(sum_x: torch.Tensor, sum_xxT: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference: upcast, then Σ and xᵀx. Roofline: n·d² FLOPs (n·d²/2 with symmetry),
    bytes ≈ n·d·sizeof(x) + 2·d²·8 (read-modify-write of Σxxᵀ) — compute-bound for n ≫ 16."""
    _check(sum_x, sum_xxT, x)
    x64 = x.to(torch.float64)  # [n, d]
    sum_x += x64.sum(0)
    sum_xxT += x64.T @ x64
    return sum_x, sum_xxT


COV_UPDATE = Op("cov_update", {"triton": _cov_update_triton, "cpp": _cov_update_cpp, "torch": cov_update_torch})
