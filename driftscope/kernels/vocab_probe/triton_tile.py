"""Triton backend: the logits tile both passes build their logits from (the fused scan in `triton_fused`, the
recount in `triton_recount`), so that identical (rows, cols) shapes give identical bits on a deterministic GPU."""
from __future__ import annotations

from driftscope.kernels._triton import tl, triton

if triton is not None:

    @triton.jit
    def _logits_tile(
        h_ptr,  # [N, D] row stride stride_h, unit column stride
        w_ptr,  # [V, D] row stride stride_w, unit column stride
        rows,  # [BLOCK_N] token ids of this block
        cols,  # [BLOCK_V] vocabulary ids (or gathered target ids in the prologue)
        row_mask,  # [BLOCK_N]
        col_mask,  # [BLOCK_V]
        D,
        stride_h,
        stride_w,
        UPCAST: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """acc[i, j] = Σ_k h[rows_i, k]·w[cols_j, k] in fp32 (ieee: no tf32 rounding of fp32 inputs).
        The scan tiles, the target prologue and the recount pass all call it, so identical (rows, cols)
        shapes give identical bits wherever the compiled dot is deterministic (the recount checks it)."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        h_row = rows.to(tl.int64)[:, None] * stride_h
        w_col = cols.to(tl.int64)[None, :] * stride_w
        # UPCAST (mixed dtypes): a 16-bit operand is converted in registers for an fp32 FMA dot. Software-pipelined
        # (num_stages > 1), those loads drive ptxas on sm_90 to 32 registers and 8,000-12,000 spill instructions in
        # the scan's k-loops at 64x128x64; unpipelined, 255 registers and 2-607 (bench/aot_resources.py).
        for d0 in tl.range(0, D, BLOCK_D, num_stages=1 if UPCAST else None):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            h = tl.load(h_ptr + h_row + dd[None, :], mask=row_mask[:, None] & dm[None, :], other=0.0)
            w = tl.load(w_ptr + w_col + dd[:, None], mask=col_mask[None, :] & dm[:, None], other=0.0)
            if UPCAST:  # mixed input dtypes: multiply in fp32
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision="ieee")
        return acc
