"""Triton backend: one fused kernel (both GEMMs, online fold over V, in-kernel top-k) and the launcher
`vocab_probe_fused`, which runs the recount kernel (`triton_recount`) for the rows the scan cannot decide."""
from __future__ import annotations

import torch

from driftscope.kernels._triton import tl, triton, triton_interpreter
from driftscope.kernels.vocab_probe.common import _merge_recount

# The fused kernel's packed outputs, one [N] row per field: fp32 [len(PACKED_FIELDS), N] and int64
# [len(PACKED_INT_FIELDS), N]. zb_top: base logit at the tuned top-1; top_vb: base max logit; zpre_*: prologue
# target logits; zy_*: scanned target logits; gt_*: strict counts against zpre_*; shift: rank_shift_top
# (-1: the top-k cannot decide). The kernel stores at row(name), the launcher reads back by name.
PACKED_FIELDS = (
    "lse_b", "lse_t", "ent_b", "ent_t", "kl_tb", "kl_bt", "zb_top", "top_vb", "zpre_b", "zpre_t", "zy_b", "zy_t",
    "logp_b", "logp_t",
)
PACKED_INT_FIELDS = ("top_b", "top_t", "gt_b", "gt_t", "shift")


def row(name: str) -> int:
    """Row of a packed field: its index in PACKED_FIELDS (fp32 output) or PACKED_INT_FIELDS (int64 output)."""
    return (PACKED_FIELDS if name in PACKED_FIELDS else PACKED_INT_FIELDS).index(name)


if triton is not None:
    from driftscope.kernels.vocab_probe.triton_recount import _vocab_probe_recount_kernel
    from driftscope.kernels.vocab_probe.triton_tile import _logits_tile

    # store-side row indices (a @triton.jit function may read only constexpr globals)
    _F_LSE_B = tl.constexpr(row("lse_b"))
    _F_LSE_T = tl.constexpr(row("lse_t"))
    _F_ENT_B = tl.constexpr(row("ent_b"))
    _F_ENT_T = tl.constexpr(row("ent_t"))
    _F_KL_TB = tl.constexpr(row("kl_tb"))
    _F_KL_BT = tl.constexpr(row("kl_bt"))
    _F_ZB_TOP = tl.constexpr(row("zb_top"))
    _F_TOP_VB = tl.constexpr(row("top_vb"))
    _F_ZPRE_B = tl.constexpr(row("zpre_b"))
    _F_ZPRE_T = tl.constexpr(row("zpre_t"))
    _F_ZY_B = tl.constexpr(row("zy_b"))
    _F_ZY_T = tl.constexpr(row("zy_t"))
    _F_LOGP_B = tl.constexpr(row("logp_b"))
    _F_LOGP_T = tl.constexpr(row("logp_t"))
    _I_TOP_B = tl.constexpr(row("top_b"))
    _I_TOP_T = tl.constexpr(row("top_t"))
    _I_GT_B = tl.constexpr(row("gt_b"))
    _I_GT_T = tl.constexpr(row("gt_t"))
    _I_SHIFT = tl.constexpr(row("shift"))

    @triton.jit
    def _vocab_probe_kernel(
        hb_ptr,  # [N, Db] base hidden states
        wb_ptr,  # [V, Db] base LM head rows (first V = valid vocabulary)
        ht_ptr,  # [N, Dt] tuned hidden states
        wt_ptr,  # [V, Dt] tuned LM head rows
        tgt_ptr,  # [N] int64 targets (unused unless HAS_TARGETS)
        outf_ptr,  # [14, N] fp32, rows PACKED_FIELDS (zb_top: base logit at the tuned top-1)
        outi_ptr,  # [5, N] int64, rows PACKED_INT_FIELDS (shift: rank_shift_top, -1: top-k cannot decide)
        N,
        V,
        Db,
        Dt,
        s_hb,
        s_wb,
        s_ht,
        s_wt,
        HAS_TARGETS: tl.constexpr,
        UPCAST_B: tl.constexpr,
        UPCAST_T: tl.constexpr,
        TOPK: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program = BLOCK_N tokens, the whole vocabulary in BLOCK_V chunks. Online state per row
        and model (sums in float64), relative to the running max m: s = Σe^{z−m}, a = Σe^{z−m}(z−m); KL sums
        k_tb = Σe^{zt−mt}((zt−mt) − (zb−mb)), k_bt symmetric. A max move δ = m_old − m_new rescales
        s ← e^δ s, a ← e^δ(a + δs), k_tb ← e^{δt}(k_tb + (δt − δb)s_t). Final: lse = m + log s,
        H = log s − a/s, KL(p‖q) = k_tb/s_t − log s_t + log s_b. Counts are strict against the
        prologue target logit zpre, the target entry excluded; zy is the scanned target logit.
        rank_shift_top: tk holds the TOPK largest base logits per row (unsorted; a chunk inserts its
        candidates > min(tk) one at a time, replacing the minimum, looping only as often as the row
        with the most candidates needs); at the end, if the base logit of the tuned top-1 is ≥ min(tk),
        every larger base logit is in tk and the rank is 1 + #{tk > it}."""
        tl.static_assert(BLOCK_V >= BLOCK_N)
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        neg_inf = float("-inf")

        zpre_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        zpre_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        y = tl.zeros([BLOCK_N], dtype=tl.int64)
        if HAS_TARGETS:
            y = tl.load(tgt_ptr + rows, mask=rmask, other=0)
            g = tl.arange(0, BLOCK_V)
            gmask = (g < BLOCK_N) & (pid * BLOCK_N + g < N)
            gid = tl.load(tgt_ptr + pid * BLOCK_N + g, mask=gmask, other=0)
            diag = tl.arange(0, BLOCK_N)[:, None] == g[None, :]
            accb = _logits_tile(
                hb_ptr, wb_ptr, rows, gid, rmask, gmask, Db, s_hb, s_wb, UPCAST_B, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            zpre_b = tl.sum(tl.where(diag, accb, 0.0), 1)
            acct = _logits_tile(
                ht_ptr, wt_ptr, rows, gid, rmask, gmask, Dt, s_ht, s_wt, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            zpre_t = tl.sum(tl.where(diag, acct, 0.0), 1)

        # Row state: the running maxima in fp32 (they are logits), the sums s, a, k in float64 as in the cpp
        # fold. Each chunk's BLOCK_V terms are summed in fp32 (tl.sum) and added to the fp64 state once per
        # chunk, so the state's rounding does not grow with the V/BLOCK_V chunk additions (2,048 at V = 262,144,
        # where an fp32 state drifts by up to ~1e-4 relative: more than a KL of 1e-3, the difference of O(10)
        # terms, can afford). Cost, estimated (no GPU was available to measure it): per row and chunk two fp64
        # exps and ~20 fp64 flops, repeated by every thread holding the row, of the order of the fold's own
        # elementwise fp32 work where fp64 runs at half the fp32 rate (H100/H200), so a few % of a kernel the
        # GEMMs dominate; on GPUs with 1/64-rate fp64, Kahan-compensated fp32 sums would be the cheaper choice.
        m_b = tl.full([BLOCK_N], neg_inf, tl.float32)
        m_t = tl.full([BLOCK_N], neg_inf, tl.float32)
        s_b = tl.zeros([BLOCK_N], dtype=tl.float64)
        s_t = tl.zeros([BLOCK_N], dtype=tl.float64)
        a_b = tl.zeros([BLOCK_N], dtype=tl.float64)
        a_t = tl.zeros([BLOCK_N], dtype=tl.float64)
        k_tb = tl.zeros([BLOCK_N], dtype=tl.float64)
        k_bt = tl.zeros([BLOCK_N], dtype=tl.float64)
        top_vb = tl.full([BLOCK_N], neg_inf, tl.float32)
        top_vt = tl.full([BLOCK_N], neg_inf, tl.float32)
        top_b = tl.zeros([BLOCK_N], dtype=tl.int64)
        top_t = tl.zeros([BLOCK_N], dtype=tl.int64)
        zb_top = tl.zeros([BLOCK_N], dtype=tl.float32)
        gt_b = tl.zeros([BLOCK_N], dtype=tl.int64)
        gt_t = tl.zeros([BLOCK_N], dtype=tl.int64)
        zy_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        zy_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        kk = tl.arange(0, TOPK)
        tk = tl.full([BLOCK_N, TOPK], neg_inf, tl.float32)  # [BLOCK_N, TOPK] largest base logits
        vloc = tl.arange(0, BLOCK_V)

        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            zb = _logits_tile(
                hb_ptr, wb_ptr, rows, cols, rmask, cmask, Db, s_hb, s_wb, UPCAST_B, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            zt = _logits_tile(
                ht_ptr, wt_ptr, rows, cols, rmask, cmask, Dt, s_ht, s_wt, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_D,
            )
            zb = tl.where(cmask[None, :], zb, neg_inf)  # [BLOCK_N, BLOCK_V]
            zt = tl.where(cmask[None, :], zt, neg_inf)

            # argmax, lowest id on ties: first index inside the chunk, strict > across chunks
            cmb = tl.max(zb, 1)
            cib = tl.argmax(zb, 1, tie_break_left=True)
            upd = cmb > top_vb
            top_vb = tl.where(upd, cmb, top_vb)
            top_b = tl.where(upd, v0 + cib.to(tl.int64), top_b)
            cmt = tl.max(zt, 1)
            cit = tl.argmax(zt, 1, tie_break_left=True)
            zb_at = tl.sum(tl.where(cols[None, :] == (v0 + cit)[:, None], zb, 0.0), 1)
            updt = cmt > top_vt
            top_vt = tl.where(updt, cmt, top_vt)
            top_t = tl.where(updt, v0 + cit.to(tl.int64), top_t)
            zb_top = tl.where(updt, zb_at, zb_top)

            # top-k of base logits: insert this chunk's candidates (> current row minimum)
            kmin = tl.min(tk, 1)
            cand = tl.where(zb > kmin[:, None], zb, neg_inf)
            n_ins = tl.max(tl.sum((cand > neg_inf).to(tl.int32), 1))
            for _ in range(0, tl.minimum(n_ins, TOPK)):
                cm = tl.max(cand, 1)
                ci = tl.argmax(cand, 1, tie_break_left=True)
                cand = tl.where(vloc[None, :] == ci[:, None], neg_inf, cand)
                ins = cm > tl.min(tk, 1)
                mi = tl.argmin(tk, 1, tie_break_left=True)
                tk = tl.where((kk[None, :] == mi[:, None]) & ins[:, None], cm[:, None], tk)

            # online softmax sums relative to the running maxima
            mb_new = tl.maximum(m_b, cmb)
            mt_new = tl.maximum(m_t, cmt)
            ub = tl.where(cmask[None, :], zb - mb_new[:, None], 0.0)
            ut = tl.where(cmask[None, :], zt - mt_new[:, None], 0.0)
            eb = tl.where(cmask[None, :], tl.exp(ub), 0.0)
            et = tl.where(cmask[None, :], tl.exp(ut), 0.0)
            dv = ut - ub
            db = tl.where(m_b == neg_inf, 0.0, m_b.to(tl.float64) - mb_new.to(tl.float64))  # fp64 from here on
            dt = tl.where(m_t == neg_inf, 0.0, m_t.to(tl.float64) - mt_new.to(tl.float64))
            alb = tl.exp(db)
            alt = tl.exp(dt)
            a_b = alb * (a_b + db * s_b) + tl.sum(eb * ub, 1).to(tl.float64)
            a_t = alt * (a_t + dt * s_t) + tl.sum(et * ut, 1).to(tl.float64)
            k_tb = alt * (k_tb + (dt - db) * s_t) + tl.sum(et * dv, 1).to(tl.float64)
            k_bt = alb * (k_bt + (db - dt) * s_b) - tl.sum(eb * dv, 1).to(tl.float64)
            s_b = alb * s_b + tl.sum(eb, 1).to(tl.float64)
            s_t = alt * s_t + tl.sum(et, 1).to(tl.float64)
            m_b = mb_new
            m_t = mt_new

            if HAS_TARGETS:
                isy = cols[None, :] == y[:, None]
                gt_b += tl.sum(((zb > zpre_b[:, None]) & (~isy)).to(tl.int64), 1)
                gt_t += tl.sum(((zt > zpre_t[:, None]) & (~isy)).to(tl.int64), 1)
                zy_b += tl.sum(tl.where(isy, zb, 0.0), 1)
                zy_t += tl.sum(tl.where(isy, zt, 0.0), 1)

        lsb = tl.log(s_b)  # fp64, like the finals below (rounded to fp32 once, by the stores)
        lst = tl.log(s_t)
        mb = m_b.to(tl.float64)
        mt = m_t.to(tl.float64)
        tl.store(outf_ptr + _F_LSE_B * N + rows, (mb + lsb).to(tl.float32), mask=rmask)
        tl.store(outf_ptr + _F_LSE_T * N + rows, (mt + lst).to(tl.float32), mask=rmask)
        tl.store(outf_ptr + _F_ENT_B * N + rows, (lsb - a_b / s_b).to(tl.float32), mask=rmask)
        tl.store(outf_ptr + _F_ENT_T * N + rows, (lst - a_t / s_t).to(tl.float32), mask=rmask)
        tl.store(outf_ptr + _F_KL_TB * N + rows, (k_tb / s_t - lst + lsb).to(tl.float32), mask=rmask)
        tl.store(outf_ptr + _F_KL_BT * N + rows, (k_bt / s_b - lsb + lst).to(tl.float32), mask=rmask)
        tl.store(outf_ptr + _F_ZB_TOP * N + rows, zb_top, mask=rmask)
        tl.store(outf_ptr + _F_TOP_VB * N + rows, top_vb, mask=rmask)
        tl.store(outf_ptr + _F_ZPRE_B * N + rows, zpre_b, mask=rmask)
        tl.store(outf_ptr + _F_ZPRE_T * N + rows, zpre_t, mask=rmask)
        tl.store(outf_ptr + _F_ZY_B * N + rows, zy_b, mask=rmask)
        tl.store(outf_ptr + _F_ZY_T * N + rows, zy_t, mask=rmask)
        logp_b = (zy_b.to(tl.float64) - mb) - lsb  # not zy - lse: lse ~1e4 rounds
        logp_t = (zy_t.to(tl.float64) - mt) - lst
        tl.store(outf_ptr + _F_LOGP_B * N + rows, logp_b.to(tl.float32), mask=rmask)
        tl.store(outf_ptr + _F_LOGP_T * N + rows, logp_t.to(tl.float32), mask=rmask)
        tl.store(outi_ptr + _I_TOP_B * N + rows, top_b, mask=rmask)
        tl.store(outi_ptr + _I_TOP_T * N + rows, top_t, mask=rmask)
        tl.store(outi_ptr + _I_GT_B * N + rows, gt_b, mask=rmask)
        tl.store(outi_ptr + _I_GT_T * N + rows, gt_t, mask=rmask)
        above = tl.sum((tk > zb_top[:, None]).to(tl.int64), 1)
        shift = tl.where(zb_top >= tl.min(tk, 1), 1 + above, -1)
        tl.store(outi_ptr + _I_SHIFT * N + rows, shift, mask=rmask)


# ----------------------------------------------------------------------------------------- launcher


# Launch configuration of both kernels (the scan and the recount), read by tests/kernels/test_triton_compile.py:
# (BLOCK_N, BLOCK_V, BLOCK_D) and num_warps on CUDA, blocks under the interpreter, the top-k width.
CUDA_BLOCKS = (64, 128, 64)
CUDA_NUM_WARPS = 8
INTERP_BLOCKS = (16, 64, 32)
TOPK = 8


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def vocab_probe_fused(h_base, w_base, h_tuned, w_tuned, targets, block_n: int | None = None,
                      block_v: int | None = None, block_d: int | None = None, topk: int = TOPK,
                      _force_recount: bool = False):
    """Launch the fused kernel over cdiv(N, block_n) programs, then the recount pass where needed.
    Inputs are already validated and cut to the vocabulary (w_*: [V, d_*]). Blocks: CUDA 64×128×64
    (two fp32 [64, 128] accumulators per program, 8 warps; untuned: no GPU was available when this
    was written), interpreter 16×64×32 (small, so TRITON_INTERPRET=1 tests stay fast).
    `_force_recount` (tests only) sends every row through the second pass."""
    on_cuda = h_base.device.type == "cuda"
    dn, dv, dd = CUDA_BLOCKS if on_cuda else INTERP_BLOCKS
    block_n, block_v, block_d = block_n or dn, block_v or dv, block_d or dd
    launch = {"num_warps": CUDA_NUM_WARPS} if on_cuda else {}
    assert block_v >= block_n and all(b & (b - 1) == 0 and b >= 16 for b in (block_n, block_v, block_d))
    n, vocab = h_base.shape[0], w_base.shape[0]
    hb, wb, ht, wt = (_rows_contig(t) for t in (h_base, w_base, h_tuned, w_tuned))
    # Mixed dtypes multiply in fp32. Under TRITON_INTERPRET=1, triton 3.9's numpy tl.dot gets bf16
    # operands wrong, so bf16 is upcast there (exact: bf16 -> fp32 loses nothing, products are exact).
    interp = triton_interpreter() and hb.device.type == "cpu"
    up_b = hb.dtype != wb.dtype or (interp and torch.bfloat16 in (hb.dtype, wb.dtype))
    up_t = ht.dtype != wt.dtype or (interp and torch.bfloat16 in (ht.dtype, wt.dtype))
    if up_b:
        hb = hb.float()
    if up_t:
        ht = ht.float()
    dev = hb.device
    has_t = targets is not None
    tgt = targets if has_t else torch.zeros(1, dtype=torch.int64, device=dev)
    outf = torch.full((len(PACKED_FIELDS), n), float("nan"), dtype=torch.float32, device=dev)
    outi = torch.full((len(PACKED_INT_FIELDS), n), -7, dtype=torch.int64, device=dev)
    common = dict(HAS_TARGETS=has_t, UPCAST_B=up_b, UPCAST_T=up_t, BLOCK_N=block_n, BLOCK_V=block_v,
                  BLOCK_D=block_d)
    assert topk >= 1 and topk & (topk - 1) == 0, "topk must be a power of two (tl.arange)"
    sizes = (n, vocab, hb.shape[1], ht.shape[1], hb.stride(0), wb.stride(0), ht.stride(0), wt.stride(0))
    n_blocks = triton.cdiv(n, block_n)
    _vocab_probe_kernel[(n_blocks,)](hb, wb, ht, wt, tgt, outf, outi, *sizes, TOPK=topk, **common, **launch)
    f = dict(zip(PACKED_FIELDS, outf))
    i = dict(zip(PACKED_INT_FIELDS, outi))

    def recount(need_s, need_b, need_t):  # second kernel over the token blocks that hold a row in need
        need = need_s | need_b | need_t
        blocks = torch.unique(need.nonzero()[:, 0] // block_n).to(torch.int32)
        thr = torch.stack([f["zb_top"], f["zy_b"], f["zy_t"]]).contiguous()
        cnt = torch.zeros((3, n), dtype=torch.int64, device=dev)
        ref = torch.full((3, n), float("nan"), dtype=torch.float32, device=dev)
        recount_t = has_t and bool(need_t.any())
        _vocab_probe_recount_kernel[(blocks.numel(),)](
            hb, wb, ht, wt, tgt, i["top_t"], blocks, thr, cnt, ref, *sizes, RECOUNT_TUNED=recount_t, **common,
            **launch,
        )
        return (cnt[0], cnt[1], cnt[2]), (ref[0], ref[1], ref[2])

    scan = (i["gt_b"], i["gt_t"], f["zpre_b"], f["zpre_t"], f["zy_b"], f["zy_t"]) if has_t else (None,) * 6
    return _merge_recount(
        recount, i["shift"], *scan, zb_top=f["zb_top"], heads=(hb, wb, ht, wt), targets=targets, force=_force_recount,
        kl_tb=f["kl_tb"], kl_bt=f["kl_bt"], logp_base=f["logp_b"] if has_t else None,
        logp_tuned=f["logp_t"] if has_t else None, top_base=i["top_b"], top_tuned=i["top_t"],
        entropy_base=f["ent_b"], entropy_tuned=f["ent_t"], lse_base=f["lse_b"], lse_tuned=f["lse_t"],
    )
