"""Triton backend, second pass: the recount kernel for the rows the fused scan (`triton_fused`) cannot decide."""
from __future__ import annotations

from driftscope.kernels._triton import tl, triton

if triton is not None:
    from driftscope.kernels.vocab_probe.triton_tile import _logits_tile

    @triton.jit
    def _vocab_probe_recount_kernel(
        hb_ptr,  # [N, Db]
        wb_ptr,  # [V, Db]
        ht_ptr,  # [N, Dt]
        wt_ptr,  # [V, Dt]
        tgt_ptr,  # [N] int64 (unused unless HAS_TARGETS)
        top_ptr,  # [N] int64 scanned tuned top-1 ids
        blocks_ptr,  # [n_programs] int32: which BLOCK_N token blocks to recount
        thr_ptr,  # [3, N] fp32: scanned base logit of the tuned top-1, scanned zy_b, scanned zy_t
        cnt_ptr,  # [3, N] int64 out: #{v≠top: z_b > thr0}, #{v≠y: z_b > thr1}, #{v≠y: z_t > thr2}
        ref_ptr,  # [3, N] fp32 out: the recomputed z_b[top], z_b[y], z_t[y]
        N,
        V,
        Db,
        Dt,
        s_hb,
        s_wb,
        s_ht,
        s_wt,
        HAS_TARGETS: tl.constexpr,
        RECOUNT_TUNED: tl.constexpr,
        UPCAST_B: tl.constexpr,
        UPCAST_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Second pass: recompute the same (token block, vocab chunk) tiles as the first pass with the
        same `_logits_tile` call and count strictly against the scanned values, each count's reference
        column (the tuned top-1, the target) excluded. The counts are exact only if these logits are the
        scanned ones bit for bit; the recomputed logits at the reference columns go out in `ref`, and
        `common._merge_recount` recounts in float64 the rows where they differ from the scanned ones.
        The tuned GEMM is redone only when a tuned target logit needs a recount (RECOUNT_TUNED)."""
        blk = tl.load(blocks_ptr + tl.program_id(0))
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        thr_s = tl.load(thr_ptr + rows, mask=rmask, other=0.0)
        thr_b = tl.load(thr_ptr + N + rows, mask=rmask, other=0.0)
        thr_t = tl.load(thr_ptr + 2 * N + rows, mask=rmask, other=0.0)
        top = tl.load(top_ptr + rows, mask=rmask, other=0)
        y = tl.zeros([BLOCK_N], dtype=tl.int64)
        if HAS_TARGETS:
            y = tl.load(tgt_ptr + rows, mask=rmask, other=0)
        c_s = tl.zeros([BLOCK_N], dtype=tl.int64)
        c_b = tl.zeros([BLOCK_N], dtype=tl.int64)
        c_t = tl.zeros([BLOCK_N], dtype=tl.int64)
        r_s = tl.zeros([BLOCK_N], dtype=tl.float32)  # picked as the scan picks zb_top and zy: 0 + z, bitwise
        r_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        r_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            zb = _logits_tile(
                hb_ptr, wb_ptr, rows, cols, rmask, cmask, Db, s_hb, s_wb, UPCAST_B, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            ist = cols[None, :] == top[:, None]
            c_s += tl.sum(((zb > thr_s[:, None]) & cmask[None, :] & (~ist)).to(tl.int64), 1)
            r_s += tl.sum(tl.where(ist, zb, 0.0), 1)
            if HAS_TARGETS:
                isy = cols[None, :] == y[:, None]
                keep = cmask[None, :] & (~isy)
                c_b += tl.sum(((zb > thr_b[:, None]) & keep).to(tl.int64), 1)
                r_b += tl.sum(tl.where(isy, zb, 0.0), 1)
                if RECOUNT_TUNED:
                    zt = _logits_tile(
                        ht_ptr, wt_ptr, rows, cols, rmask, cmask, Dt, s_ht, s_wt, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_D,
                    )
                    c_t += tl.sum(((zt > thr_t[:, None]) & keep).to(tl.int64), 1)
                    r_t += tl.sum(tl.where(isy, zt, 0.0), 1)
        tl.store(cnt_ptr + rows, c_s, mask=rmask)
        tl.store(cnt_ptr + N + rows, c_b, mask=rmask)
        tl.store(cnt_ptr + 2 * N + rows, c_t, mask=rmask)
        tl.store(ref_ptr + rows, r_s, mask=rmask)
        tl.store(ref_ptr + N + rows, r_b, mask=rmask)
        tl.store(ref_ptr + 2 * N + rows, r_t, mask=rmask)
