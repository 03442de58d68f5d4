"""Triton backend, panel path: the fold kernel over precomputed fp32 logits panels (base and tuned, [rows, V]) and
its launcher `_fold_panel`, which writes one pair's per-row results for those rows. `triton_panel` runs the GEMMs."""
from __future__ import annotations

import torch

from driftscope.kernels._triton import tl, triton

# packed outputs, one [N] row per field: fp32 [len(FOLD_FIELDS), N], int64 [len(FOLD_INT_FIELDS), N]
FOLD_FIELDS = ("lse_base", "lse_tuned", "entropy_base", "entropy_tuned", "kl_tb", "kl_bt", "logp_base", "logp_tuned")
FOLD_INT_FIELDS = ("top_base", "top_tuned", "rank_base", "rank_tuned", "rank_shift_top")

if triton is not None:

    @triton.jit
    def _panel_fold_kernel(
        zb_ptr,  # [R, ld] fp32 base logits of the panel's R rows: V valid columns, then -inf up to ld
        zt_ptr,  # [R, ld] fp32 tuned logits
        tgt_ptr,  # [R] int64 targets of the panel's rows (unused unless HAS_TARGETS)
        outf_ptr,  # [8, N] fp32, rows FOLD_FIELDS; this panel writes columns r0 .. r0 + R
        outi_ptr,  # [5, N] int64, rows FOLD_INT_FIELDS
        r0,
        N,
        V,
        ld,
        HAS_TARGETS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """One program = one row, the vocabulary in BLOCK_V blocks, read straight from the panels.

        Pass 1, per model, relative to the running max m (fp32; the sums in float64): s = Σe^{z−m},
        a = Σe^{z−m}(z−m), and the KL sums k_tb = Σe^{zt−mt}((zt−mt) − (zb−mb)), k_bt symmetric. A block's
        terms are summed in fp32 and added to the fp64 state once per block; a max move δ = m_old − m_new ≤ 0
        rescales s ← e^δ s, a ← e^δ(a + δs), k_tb ← e^{δt}(k_tb + (δt − δb)s_t) (as the cpp fold). Final:
        lse = m + log s, H = log s − a/s, KL(p‖q) = k_tb/s_t − log s_t + log s_b, logp = (z_y − m) − log s.
        Argmaxes: first index inside a block, strict > across blocks (lowest id on ties). The target logits
        z_y are loaded from the panels before the scan and counted against (strict >, so y never counts
        itself). Pass 2 over the base row: rank_shift_top = 1 + #{v : z_b,v > z_b[top_tuned]}. Every value
        compared is read from the buffer that is counted: the ranks are exact by construction."""
        r = tl.program_id(0).to(tl.int64)
        zb_row = zb_ptr + r * ld
        zt_row = zt_ptr + r * ld
        neg_inf = float("-inf")
        offs = tl.arange(0, BLOCK_V)

        zy_b = tl.full([], 0.0, tl.float32)
        zy_t = tl.full([], 0.0, tl.float32)
        if HAS_TARGETS:
            y = tl.load(tgt_ptr + r)
            zy_b = tl.load(zb_row + y)
            zy_t = tl.load(zt_row + y)
        m_b = tl.full([], neg_inf, tl.float32)
        m_t = tl.full([], neg_inf, tl.float32)
        s_b = tl.full([], 0.0, tl.float64)
        s_t = tl.full([], 0.0, tl.float64)
        a_b = tl.full([], 0.0, tl.float64)
        a_t = tl.full([], 0.0, tl.float64)
        k_tb = tl.full([], 0.0, tl.float64)
        k_bt = tl.full([], 0.0, tl.float64)
        top_b = tl.full([], 0, tl.int64)
        top_t = tl.full([], 0, tl.int64)
        gt_b = tl.full([], 0, tl.int64)
        gt_t = tl.full([], 0, tl.int64)

        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            cmask = cols < V
            zb = tl.load(zb_row + cols, mask=cols < ld, other=neg_inf)  # [BLOCK_V]; ld % 16 == 0: vector loads
            zt = tl.load(zt_row + cols, mask=cols < ld, other=neg_inf)
            cmb = tl.max(zb, 0)
            cmt = tl.max(zt, 0)
            top_b = tl.where(cmb > m_b, v0 + tl.argmax(zb, 0, tie_break_left=True).to(tl.int64), top_b)
            top_t = tl.where(cmt > m_t, v0 + tl.argmax(zt, 0, tie_break_left=True).to(tl.int64), top_t)
            mb_new = tl.maximum(m_b, cmb)
            mt_new = tl.maximum(m_t, cmt)
            ub = tl.where(cmask, zb - mb_new, 0.0)
            ut = tl.where(cmask, zt - mt_new, 0.0)
            eb = tl.where(cmask, tl.exp(ub), 0.0)
            et = tl.where(cmask, tl.exp(ut), 0.0)
            dv = ut - ub
            db = tl.where(m_b == neg_inf, 0.0, m_b.to(tl.float64) - mb_new.to(tl.float64))  # fp64 from here on
            dt = tl.where(m_t == neg_inf, 0.0, m_t.to(tl.float64) - mt_new.to(tl.float64))
            alb = tl.exp(db)
            alt = tl.exp(dt)
            a_b = alb * (a_b + db * s_b) + tl.sum(eb * ub, 0).to(tl.float64)
            a_t = alt * (a_t + dt * s_t) + tl.sum(et * ut, 0).to(tl.float64)
            k_tb = alt * (k_tb + (dt - db) * s_t) + tl.sum(et * dv, 0).to(tl.float64)
            k_bt = alb * (k_bt + (db - dt) * s_b) - tl.sum(eb * dv, 0).to(tl.float64)
            s_b = alb * s_b + tl.sum(eb, 0).to(tl.float64)
            s_t = alt * s_t + tl.sum(et, 0).to(tl.float64)
            m_b = mb_new
            m_t = mt_new
            if HAS_TARGETS:  # columns past V are -inf: never greater
                gt_b += tl.sum((zb > zy_b).to(tl.int32), 0).to(tl.int64)
                gt_t += tl.sum((zt > zy_t).to(tl.int32), 0).to(tl.int64)

        zb_top = tl.load(zb_row + top_t)  # pass 2: the base rank of the tuned top-1
        gt_s = tl.full([], 0, tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            zb = tl.load(zb_row + cols, mask=cols < ld, other=neg_inf)
            gt_s += tl.sum((zb > zb_top).to(tl.int32), 0).to(tl.int64)

        o = r0 + r
        lsb = tl.log(s_b)  # fp64, like the finals below (rounded to fp32 once, by the stores)
        lst = tl.log(s_t)
        mb = m_b.to(tl.float64)
        mt = m_t.to(tl.float64)
        tl.store(outf_ptr + 0 * N + o, (mb + lsb).to(tl.float32))
        tl.store(outf_ptr + 1 * N + o, (mt + lst).to(tl.float32))
        tl.store(outf_ptr + 2 * N + o, (lsb - a_b / s_b).to(tl.float32))
        tl.store(outf_ptr + 3 * N + o, (lst - a_t / s_t).to(tl.float32))
        tl.store(outf_ptr + 4 * N + o, (k_tb / s_t - lst + lsb).to(tl.float32))
        tl.store(outf_ptr + 5 * N + o, (k_bt / s_b - lsb + lst).to(tl.float32))
        tl.store(outi_ptr + 0 * N + o, top_b)
        tl.store(outi_ptr + 1 * N + o, top_t)
        tl.store(outi_ptr + 4 * N + o, 1 + gt_s)
        if HAS_TARGETS:
            tl.store(outf_ptr + 6 * N + o, ((zy_b.to(tl.float64) - mb) - lsb).to(tl.float32))  # not zy − lse
            tl.store(outf_ptr + 7 * N + o, ((zy_t.to(tl.float64) - mt) - lst).to(tl.float32))
            tl.store(outi_ptr + 2 * N + o, 1 + gt_b)
            tl.store(outi_ptr + 3 * N + o, 1 + gt_t)


# ----------------------------------------------------------------------------------------- launcher

CUDA_BLOCK_V = 1024  # the fold's launch configuration (see `_fold_panel`), read by tests/kernels/test_triton_compile.py
CUDA_NUM_WARPS = 4
INTERP_BLOCK_V = 512


def _fold_panel(zb: torch.Tensor, zt: torch.Tensor, targets: torch.Tensor | None, r0: int, outf: torch.Tensor,
                outi: torch.Tensor, block_v: int | None = None) -> None:
    """Fold one panel pair: zb, zt [R, V] fp32 views with unit column stride and the same row stride ld, whose
    columns V .. ld hold -inf (the loads run to ld, a multiple of 16, so that they vectorize);
    targets: the panel's [R] int64 ids or None; writes columns r0 .. r0 + R of outf [8, N] / outi [5, N].
    Blocks: CUDA BLOCK_V = 1024 with 4 warps: 8 fp32 per thread and array, 120 registers for sm_90 (ptxas,
    compiled without a GPU), so 4 programs (16 warps) per SM; BLOCK_V = 4096 with 8 warps takes 184 registers,
    one program per SM. Untuned (no GPU has been lent). Interpreter: 512 (TRITON_INTERPRET=1 tests stay fast
    and still see 2 to 6 blocks, the last one partial, at V = 1000 .. 3000)."""
    rows, vocab = zb.shape
    assert zt.shape == zb.shape and zb.dtype == zt.dtype == torch.float32
    assert zb.stride(1) == zt.stride(1) == 1 and zb.stride(0) == zt.stride(0) >= vocab
    assert outf.shape == (len(FOLD_FIELDS), outf.shape[1]) and outi.shape == (len(FOLD_INT_FIELDS), outf.shape[1])
    assert outf.is_contiguous() and outi.is_contiguous() and r0 + rows <= outf.shape[1]
    on_cuda = zb.device.type == "cuda"
    block_v = block_v or (CUDA_BLOCK_V if on_cuda else INTERP_BLOCK_V)
    assert block_v & (block_v - 1) == 0 and block_v >= 16
    has_t = targets is not None
    if has_t:
        assert targets.shape == (rows,) and targets.dtype == torch.int64 and targets.is_contiguous()
    tgt = targets if has_t else torch.zeros(1, dtype=torch.int64, device=zb.device)
    _panel_fold_kernel[(rows,)](zb, zt, tgt, outf, outi, r0, outf.shape[1], vocab, zb.stride(0), HAS_TARGETS=has_t,
                                BLOCK_V=block_v, **({"num_warps": CUDA_NUM_WARPS} if on_cuda else {}))
