"""Fused vocabulary probe: exact per-token KL (both directions), log-probs, ranks, argmaxes, the base
rank of the tuned top-1, entropies and log-sum-exps of two LM heads, without an [N, V] logits tensor.

Contract: `vocab_probe(h_base, w_base, h_tuned, w_tuned, targets=None, *, valid_vocab=None)` returns a
`VocabProbeResult` of [N] tensors; backends `triton` (CUDA), `cpp` (driftscope._C) and `torch`
(`vocab_probe_torch`, the fp32 reference) are picked by `kernels._dispatch.select`.

Definitions (DESIGN.md §3), z_b = h_base·w_baseᵀ, z_t = h_tuned·w_tunedᵀ as fp32 logits from fp32
accumulation (bf16/fp16 inputs are multiplied exactly and summed in fp32; logits are never rounded),
q = softmax(z_b), p = softmax(z_t), y = target:
    kl_tb = Σ_v p_v (log p_v − log q_v)      kl_bt = Σ_v q_v (log q_v − log p_v)
    lse_* = log Σ_v e^{z_v}                  entropy_* = lse − Σ_v softmax(z)_v z_v
    logp_* = z_y − lse                       rank_* = 1 + #{v : z_v > z_y}   (ties favour y)
    top_* = lowest id among the maxima       rank_shift_top = 1 + #{v : z_b,v > z_b,top_tuned}
Ranks are exact with respect to the logits the backend computes: the count is strict, an entry equal
to the target's logit (a duplicate LM-head row) never counts, and the target's own entry is excluded.

How ranks stay exact without holding logits (cpp and triton):
  1. Before the scan, each row's target logit z_pre is computed by the same GEMM machinery (cpp: torch
     matmul of the token tile against the gathered target rows; triton: the same `_logits_tile` dot
     with the gathered rows as the column block). The scan counts #{v ≠ y : z_v > z_pre} and records
     the scanned value z_y of the target entry.
  2. At the end, z_pre == z_y bitwise (the usual case) proves the count is #{v : z_v > z_y}. Rows
     where it differs are recounted in a second pass that recomputes the same tiles with identical
     calls (same tile, chunk and block shapes, so the same bits) and counts against the scanned z_y.
  3. rank_shift_top: the scan tracks the tuned running argmax and the base logit at that id, taken
     from the same tile (z_b,top). Both keep the k largest base logits per row; if z_b,top ≥ the k-th
     largest, every larger base logit is in the list and the rank is 1 + #{list > z_b,top}. Rows with
     top_tuned's base logit equal to the base max have rank 1. Only rows whose rank is beyond k
     (cpp k=32, triton k=8) go to the second pass, which recomputes the base tiles of their token
     tiles with identical calls and counts exactly.
  The second pass relies on the GEMM being deterministic for identical calls (same shapes, same
  buffers, same thread count), which torch CPU BLAS and a fixed Triton kernel are.

Triton design choice: one fully fused kernel (tl.dot over d in BLOCK_D steps for both heads, online
fold across V in BLOCK_V chunks, fp32 running state in registers), so logits never reach global
memory and bf16 inputs get fp32 accumulation inside the MMA. The alternative — cuBLAS per chunk into
an fp32 buffer + a Triton fold — costs 8 bytes of buffer traffic per logit against 2·d FLOPs (1280
FLOP/byte at d=5120, comfortably compute-bound on H100) and would reuse cuBLAS's GEMM, but needs a
bf16×bf16→fp32-output GEMM per chunk from torch; the fused kernel avoids that dependency and the
extra launches. Its costs: each program streams all of W (shared through L2 when the concurrent
programs walk V in step) and re-reads its h tile per chunk, so arithmetic intensity grows with
BLOCK_N; the in-kernel top-8 costs a few extra reductions per chunk (one per inserted candidate of
the busiest row), and token blocks where some row's rank_shift_top exceeds 8 redo the base GEMM in
the recount pass (up to +50% over the GEMM floor for those blocks).
Blocks are constexpr; the CUDA defaults are untuned (no GPU here): the H100 target (≤ 1.25× of the
GEMM floor) is unmeasured. Tests run the kernels under TRITON_INTERPRET=1 with small blocks.

cpp design: chunk-outer (W chunk converted to fp32 once), token-tile-inner; per (tile, chunk) two
torch.matmul into preallocated fp32 [tile, chunk] buffers, then one OpenMP+SIMD pass of
driftscope._C.VocabFold.fold over the tile while it is in cache. Peak extra memory: the fp32 copies
of h (input-sized), two [tile, chunk] buffers, an fp32 W chunk and O(N·k) state — never O(N·V).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from driftscope.kernels._dispatch import select, triton_interpreter

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional on CPU builds; the backend reports itself unavailable
    triton = None

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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
        The same helper makes the scan tiles, the target prologue and the recount pass, so identical
        (rows, cols) shapes give identical bits."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        h_row = rows.to(tl.int64)[:, None] * stride_h
        w_col = cols.to(tl.int64)[None, :] * stride_w
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dm = dd < D
            h = tl.load(h_ptr + h_row + dd[None, :], mask=row_mask[:, None] & dm[None, :], other=0.0)
            w = tl.load(w_ptr + w_col + dd[:, None], mask=col_mask[None, :] & dm[:, None], other=0.0)
            if UPCAST:  # mixed input dtypes: multiply in fp32
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision="ieee")
        return acc

    @triton.jit
    def _vocab_probe_kernel(
        hb_ptr,  # [N, Db] base hidden states
        wb_ptr,  # [V, Db] base LM head rows (first V = valid vocabulary)
        ht_ptr,  # [N, Dt] tuned hidden states
        wt_ptr,  # [V, Dt] tuned LM head rows
        tgt_ptr,  # [N] int64 targets (unused unless HAS_TARGETS)
        outf_ptr,  # [14, N] fp32: lse_b, lse_t, ent_b, ent_t, kl_tb, kl_bt, zb_at_top_t, top_v_b, zpre_b, zpre_t, zy_b, zy_t, logp_b, logp_t
        outi_ptr,  # [5, N] int64: top_b, top_t, gt_b, gt_t, rank_shift_top (-1: top-k cannot decide)
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
        and model, relative to the running max m: s = Σe^{z−m}, a = Σe^{z−m}(z−m); KL sums
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
            accb = _logits_tile(hb_ptr, wb_ptr, rows, gid, rmask, gmask, Db, s_hb, s_wb, UPCAST_B, BLOCK_N, BLOCK_V, BLOCK_D)
            zpre_b = tl.sum(tl.where(diag, accb, 0.0), 1)
            acct = _logits_tile(ht_ptr, wt_ptr, rows, gid, rmask, gmask, Dt, s_ht, s_wt, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_D)
            zpre_t = tl.sum(tl.where(diag, acct, 0.0), 1)

        m_b = tl.full([BLOCK_N], neg_inf, tl.float32)
        m_t = tl.full([BLOCK_N], neg_inf, tl.float32)
        s_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        s_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        a_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        a_t = tl.zeros([BLOCK_N], dtype=tl.float32)
        k_tb = tl.zeros([BLOCK_N], dtype=tl.float32)
        k_bt = tl.zeros([BLOCK_N], dtype=tl.float32)
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
            zb = _logits_tile(hb_ptr, wb_ptr, rows, cols, rmask, cmask, Db, s_hb, s_wb, UPCAST_B, BLOCK_N, BLOCK_V, BLOCK_D)
            zt = _logits_tile(ht_ptr, wt_ptr, rows, cols, rmask, cmask, Dt, s_ht, s_wt, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_D)
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
            db = tl.where(m_b == neg_inf, 0.0, m_b - mb_new)
            dt = tl.where(m_t == neg_inf, 0.0, m_t - mt_new)
            alb = tl.exp(db)
            alt = tl.exp(dt)
            a_b = alb * (a_b + db * s_b) + tl.sum(eb * ub, 1)
            a_t = alt * (a_t + dt * s_t) + tl.sum(et * ut, 1)
            k_tb = alt * (k_tb + (dt - db) * s_t) + tl.sum(et * dv, 1)
            k_bt = alb * (k_bt + (db - dt) * s_b) - tl.sum(eb * dv, 1)
            s_b = alb * s_b + tl.sum(eb, 1)
            s_t = alt * s_t + tl.sum(et, 1)
            m_b = mb_new
            m_t = mt_new

            if HAS_TARGETS:
                isy = cols[None, :] == y[:, None]
                gt_b += tl.sum(((zb > zpre_b[:, None]) & (~isy)).to(tl.int64), 1)
                gt_t += tl.sum(((zt > zpre_t[:, None]) & (~isy)).to(tl.int64), 1)
                zy_b += tl.sum(tl.where(isy, zb, 0.0), 1)
                zy_t += tl.sum(tl.where(isy, zt, 0.0), 1)

        lsb = tl.log(s_b)
        lst = tl.log(s_t)
        tl.store(outf_ptr + 0 * N + rows, m_b + lsb, mask=rmask)
        tl.store(outf_ptr + 1 * N + rows, m_t + lst, mask=rmask)
        tl.store(outf_ptr + 2 * N + rows, lsb - a_b / s_b, mask=rmask)
        tl.store(outf_ptr + 3 * N + rows, lst - a_t / s_t, mask=rmask)
        tl.store(outf_ptr + 4 * N + rows, k_tb / s_t - lst + lsb, mask=rmask)
        tl.store(outf_ptr + 5 * N + rows, k_bt / s_b - lsb + lst, mask=rmask)
        tl.store(outf_ptr + 6 * N + rows, zb_top, mask=rmask)
        tl.store(outf_ptr + 7 * N + rows, top_vb, mask=rmask)
        tl.store(outf_ptr + 8 * N + rows, zpre_b, mask=rmask)
        tl.store(outf_ptr + 9 * N + rows, zpre_t, mask=rmask)
        tl.store(outf_ptr + 10 * N + rows, zy_b, mask=rmask)
        tl.store(outf_ptr + 11 * N + rows, zy_t, mask=rmask)
        tl.store(outf_ptr + 12 * N + rows, (zy_b - m_b) - lsb, mask=rmask)  # not zy - lse: lse ~1e4 rounds
        tl.store(outf_ptr + 13 * N + rows, (zy_t - m_t) - lst, mask=rmask)
        tl.store(outi_ptr + 0 * N + rows, top_b, mask=rmask)
        tl.store(outi_ptr + 1 * N + rows, top_t, mask=rmask)
        tl.store(outi_ptr + 2 * N + rows, gt_b, mask=rmask)
        tl.store(outi_ptr + 3 * N + rows, gt_t, mask=rmask)
        above = tl.sum((tk > zb_top[:, None]).to(tl.int64), 1)
        shift = tl.where(zb_top >= tl.min(tk, 1), 1 + above, -1)
        tl.store(outi_ptr + 4 * N + rows, shift, mask=rmask)

    @triton.jit
    def _vocab_probe_recount_kernel(
        hb_ptr,  # [N, Db]
        wb_ptr,  # [V, Db]
        ht_ptr,  # [N, Dt]
        wt_ptr,  # [V, Dt]
        tgt_ptr,  # [N] int64 (unused unless HAS_TARGETS)
        blocks_ptr,  # [n_programs] int32: which BLOCK_N token blocks to recount
        thr_ptr,  # [3, N] fp32: base logit of the tuned top-1, scanned zy_b, scanned zy_t
        cnt_ptr,  # [3, N] int64 out: #{z_b > thr0}, #{v≠y: z_b > thr1}, #{v≠y: z_t > thr2}
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
        same `_logits_tile` call, so the logits are bitwise the scanned ones, and count exactly. The
        tuned GEMM is redone only when a tuned target logit needs a recount (RECOUNT_TUNED)."""
        blk = tl.load(blocks_ptr + tl.program_id(0))
        rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        thr_s = tl.load(thr_ptr + rows, mask=rmask, other=0.0)
        thr_b = tl.load(thr_ptr + N + rows, mask=rmask, other=0.0)
        thr_t = tl.load(thr_ptr + 2 * N + rows, mask=rmask, other=0.0)
        y = tl.zeros([BLOCK_N], dtype=tl.int64)
        if HAS_TARGETS:
            y = tl.load(tgt_ptr + rows, mask=rmask, other=0)
        c_s = tl.zeros([BLOCK_N], dtype=tl.int64)
        c_b = tl.zeros([BLOCK_N], dtype=tl.int64)
        c_t = tl.zeros([BLOCK_N], dtype=tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            zb = _logits_tile(hb_ptr, wb_ptr, rows, cols, rmask, cmask, Db, s_hb, s_wb, UPCAST_B, BLOCK_N, BLOCK_V, BLOCK_D)
            c_s += tl.sum(((zb > thr_s[:, None]) & cmask[None, :]).to(tl.int64), 1)
            if HAS_TARGETS:
                keep = cmask[None, :] & (cols[None, :] != y[:, None])
                c_b += tl.sum(((zb > thr_b[:, None]) & keep).to(tl.int64), 1)
                if RECOUNT_TUNED:
                    zt = _logits_tile(ht_ptr, wt_ptr, rows, cols, rmask, cmask, Dt, s_ht, s_wt, UPCAST_T, BLOCK_N, BLOCK_V, BLOCK_D)
                    c_t += tl.sum(((zt > thr_t[:, None]) & keep).to(tl.int64), 1)
        tl.store(cnt_ptr + rows, c_s, mask=rmask)
        tl.store(cnt_ptr + N + rows, c_b, mask=rmask)
        tl.store(cnt_ptr + 2 * N + rows, c_t, mask=rmask)


# ----------------------------------------------------------------------------------------- launcher


@dataclass
class VocabProbeResult:
    """Per-token vocabulary metrics, all [N]; float32 except ranks/ids (int64). Target metrics are
    None when `targets` was None. See the module docstring for definitions and tie rules."""

    kl_tb: torch.Tensor
    kl_bt: torch.Tensor
    logp_base: torch.Tensor | None
    logp_tuned: torch.Tensor | None
    rank_base: torch.Tensor | None
    rank_tuned: torch.Tensor | None
    top_base: torch.Tensor
    top_tuned: torch.Tensor
    rank_shift_top: torch.Tensor
    entropy_base: torch.Tensor
    entropy_tuned: torch.Tensor
    lse_base: torch.Tensor
    lse_tuned: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_inputs(h_base, w_base, h_tuned, w_tuned, targets, valid_vocab):
    """Validate user inputs (ValueError naming the argument); return the heads cut to the vocabulary."""
    named = {"h_base": h_base, "w_base": w_base, "h_tuned": h_tuned, "w_tuned": w_tuned}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D ([N, d] or [V, d]), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    device = h_base.device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but h_base is on {device}; all inputs must share a device")
    if h_base.shape[0] != h_tuned.shape[0]:
        raise ValueError(f"h_base has {h_base.shape[0]} tokens but h_tuned has {h_tuned.shape[0]}")
    for model, h, w in (("base", h_base, w_base), ("tuned", h_tuned, w_tuned)):
        if h.shape[1] != w.shape[1]:
            raise ValueError(f"h_{model} has d={h.shape[1]} but w_{model} rows have d={w.shape[1]}")
        if h.shape[1] == 0:
            raise ValueError(f"h_{model} has d=0")
    vb, vt = w_base.shape[0], w_tuned.shape[0]
    if valid_vocab is None:
        if vb != vt:
            raise ValueError(
                f"vocabulary sizes differ: w_base has {vb} rows, w_tuned has {vt}; pass valid_vocab=<tokenizer "
                f"vocab size> (<= {min(vb, vt)}) if the extra rows are ids the tokenizer never produces"
            )
        vocab = vb
    else:
        vocab = int(valid_vocab)
        if not 1 <= vocab <= min(vb, vt):
            raise ValueError(
                f"valid_vocab={valid_vocab} is not covered by both heads (w_base has {vb} rows, w_tuned has {vt}); "
                f"expected 1 <= valid_vocab <= {min(vb, vt)}"
            )
    if vocab == 0:
        raise ValueError("w_base and w_tuned have 0 rows (empty vocabulary)")
    if targets is not None:
        if not isinstance(targets, torch.Tensor):
            raise ValueError(f"targets must be a torch.Tensor or None, got {type(targets).__name__}")
        if targets.dim() != 1 or targets.shape[0] != h_base.shape[0]:
            raise ValueError(f"targets must have shape [{h_base.shape[0]}], got {tuple(targets.shape)}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
        if targets.device != device:
            raise ValueError(f"targets is on {targets.device} but h_base is on {device}")
        if targets.numel():
            bad = (targets < 0) | (targets >= vocab)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"targets[{i}]={int(targets[i])} is outside the vocabulary [0, {vocab})")
        targets = targets.to(torch.int64).contiguous()
    return w_base[:vocab], w_tuned[:vocab], targets, vocab


def _empty_result(n: int, device, has_targets: bool) -> VocabProbeResult:
    f = lambda: torch.empty(n, dtype=torch.float32, device=device)  # noqa: E731
    i = lambda: torch.empty(n, dtype=torch.int64, device=device)  # noqa: E731
    return VocabProbeResult(
        kl_tb=f(), kl_bt=f(), logp_base=f() if has_targets else None, logp_tuned=f() if has_targets else None,
        rank_base=i() if has_targets else None, rank_tuned=i() if has_targets else None, top_base=i(), top_tuned=i(),
        rank_shift_top=i(), entropy_base=f(), entropy_tuned=f(), lse_base=f(), lse_tuned=f(),
    )


def vocab_probe(
    h_base: torch.Tensor,
    w_base: torch.Tensor,
    h_tuned: torch.Tensor,
    w_tuned: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    valid_vocab: int | None = None,
) -> VocabProbeResult:
    """Exact per-token vocabulary metrics of a base and a tuned LM head, without [N, V] logits.

    h_*: [N, d_*] final normed hidden states; w_*: [V_*, d_*] LM-head rows (float32/bfloat16/float16);
    targets: [N] int64/int32 next-token ids or None (target metrics are then None). valid_vocab: the
    tokenizer's vocabulary size when the heads are padded (rows beyond it are never produced);
    required when the heads' row counts differ. The backend comes from kernels._dispatch.select.
    """
    w_base, w_tuned, targets, vocab = _check_inputs(h_base, w_base, h_tuned, w_tuned, targets, valid_vocab)
    backend = select(h_base.device, ("triton", "cpp", "torch"))
    if h_base.shape[0] == 0:
        return _empty_result(0, h_base.device, targets is not None)
    if backend == "triton":
        return _vocab_probe_triton(h_base, w_base, h_tuned, w_tuned, targets)
    if backend == "cpp":
        return _vocab_probe_cpp(h_base, w_base, h_tuned, w_tuned, targets)
    return vocab_probe_torch(h_base, w_base, h_tuned, w_tuned, targets)


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _vocab_probe_triton(h_base, w_base, h_tuned, w_tuned, targets, block_n: int | None = None,
                        block_v: int | None = None, block_d: int | None = None, topk: int = 8,
                        _force_recount: bool = False):
    """Launch the fused kernel over cdiv(N, block_n) programs, then the recount pass where needed.
    Inputs are already validated and cut to the vocabulary (w_*: [V, d_*]). Blocks: CUDA 64×128×64
    (two fp32 [64, 128] accumulators per program, 8 warps; untuned: no GPU was available when this
    was written), interpreter 16×64×32 (small, so TRITON_INTERPRET=1 tests stay fast).
    `_force_recount` (tests only) sends every row through the second pass."""
    on_cuda = h_base.device.type == "cuda"
    block_n = block_n or (64 if on_cuda else 16)
    block_v = block_v or (128 if on_cuda else 64)
    block_d = block_d or (64 if on_cuda else 32)
    launch = {"num_warps": 8} if on_cuda else {}
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
    outf = torch.full((14, n), float("nan"), dtype=torch.float32, device=dev)
    outi = torch.full((5, n), -7, dtype=torch.int64, device=dev)
    common = dict(HAS_TARGETS=has_t, UPCAST_B=up_b, UPCAST_T=up_t, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d)
    assert topk >= 1 and topk & (topk - 1) == 0, "topk must be a power of two (tl.arange)"
    strides = (hb.stride(0), wb.stride(0), ht.stride(0), wt.stride(0))
    n_blocks = triton.cdiv(n, block_n)
    _vocab_probe_kernel[(n_blocks,)](hb, wb, ht, wt, tgt, outf, outi, n, vocab, hb.shape[1], ht.shape[1], *strides,
                                     TOPK=topk, **common, **launch)
    lse_b, lse_t, ent_b, ent_t, kl_tb, kl_bt, zb_top, top_vb, zpre_b, zpre_t, zy_b, zy_t, logp_b, logp_t = outf
    top_b, top_t, gt_b, gt_t, shift = outi

    need_s = (shift < 0) | _force_recount  # the top-k cannot decide: count the base rank exactly
    need_b = ((zpre_b != zy_b) | _force_recount) if has_t else None
    need_t = ((zpre_t != zy_t) | _force_recount) if has_t else None
    need = need_s | need_b | need_t if has_t else need_s
    rank_b = gt_b + 1 if has_t else None
    rank_t = gt_t + 1 if has_t else None
    if bool(need.any()):
        blocks = torch.unique(need.nonzero()[:, 0] // block_n).to(torch.int32)
        thr = torch.stack([zb_top, zy_b, zy_t]).contiguous()
        cnt = torch.zeros((3, n), dtype=torch.int64, device=dev)
        recount_t = has_t and bool(need_t.any())
        _vocab_probe_recount_kernel[(blocks.numel(),)](
            hb, wb, ht, wt, tgt, blocks, thr, cnt, n, vocab, hb.shape[1], ht.shape[1], *strides,
            RECOUNT_TUNED=recount_t, **common, **launch,
        )
        in_blk = torch.zeros(n, dtype=torch.bool, device=dev)
        in_blk[(blocks.long()[:, None] * block_n + torch.arange(block_n, device=dev)).flatten().clamp(max=n - 1)] = True
        shift = torch.where(need_s & in_blk, cnt[0] + 1, shift)
        if has_t:
            rank_b = torch.where(need_b & in_blk, cnt[1] + 1, rank_b)
            rank_t = torch.where(need_t & in_blk, cnt[2] + 1, rank_t)
    return VocabProbeResult(
        kl_tb=kl_tb, kl_bt=kl_bt, logp_base=logp_b if has_t else None, logp_tuned=logp_t if has_t else None,
        rank_base=rank_b, rank_tuned=rank_t, top_base=top_b, top_tuned=top_t, rank_shift_top=shift,
        entropy_base=ent_b, entropy_tuned=ent_t, lse_base=lse_b, lse_tuned=lse_t,
    )


def _cpp_tile_sizes(n: int, vocab: int) -> tuple[int, int]:
    """Token tile × vocab chunk: each fp32 [tile, chunk] logits tile is 1 MiB, so with the fold's rows
    split over two threads each core folds 1 MiB of (base + tuned) logits = its L2 (Zen: 1 MiB/core).
    Larger than strictly L2-optimal for the fold on purpose: every GEMM call ends in a thread barrier,
    and fewer, bigger calls keep that overhead small (measured: 256×512 tiles cost ~2× the CPU time
    of the GEMM floor on a loaded 2-core machine; the fold itself is ~3% of the GEMM time)."""
    return min(n, 256), min(vocab, 1024)


def _vocab_probe_cpp(h_base, w_base, h_tuned, w_tuned, targets, tile: int | None = None, chunk: int | None = None,
                     topk: int = 32, _perturb_prologue: bool = False):
    """CPU backend: torch GEMM per (chunk, tile) into fp32 buffers, fused fold in driftscope._C.
    `_perturb_prologue` (tests only) nudges the pre-known target logits by one ulp to exercise the
    exact recount of rows whose prologue logit is not the scanned one."""
    from driftscope import _C

    n, vocab = h_base.shape[0], w_base.shape[0]
    dt_tile, dt_chunk = _cpp_tile_sizes(n, vocab)
    tile, chunk = tile or dt_tile, min(chunk or dt_chunk, vocab)
    assert tile >= 1 and chunk >= 1
    hb = h_base.float().contiguous()  # [N, d_b]; input-sized copy (no copy for contiguous fp32)
    ht = h_tuned.float().contiguous()
    has_t = targets is not None
    zbuf = torch.empty(tile * chunk, dtype=torch.float32)
    tbuf = torch.empty(tile * chunk, dtype=torch.float32)
    tiles = [(r0, min(n, r0 + tile)) for r0 in range(0, n, tile)]
    chunks = [(c0, min(vocab, c0 + chunk)) for c0 in range(0, vocab, chunk)]

    def head_chunk(w, c0, c1):  # [c1-c0, d] fp32 (a view when w is fp32 with unit column stride)
        return w[c0:c1].to(torch.float32)

    def gemm(h, w_c, r0, r1, buf):  # identical call for identical (tile, chunk): same bits in pass 2
        out = buf[: (r1 - r0) * w_c.shape[0]].view(r1 - r0, w_c.shape[0])
        torch.matmul(h[r0:r1], w_c.T, out=out)
        return out

    zpre_b = zpre_t = None
    if has_t:
        zpre_b = torch.empty(n, dtype=torch.float32)
        zpre_t = torch.empty(n, dtype=torch.float32)
        for r0, r1 in tiles:  # prologue: target logits by the same BLAS, [tile, tile] -> diagonal
            y = targets[r0:r1]
            zpre_b[r0:r1] = torch.matmul(hb[r0:r1], w_base[y].to(torch.float32).T).diagonal()
            zpre_t[r0:r1] = torch.matmul(ht[r0:r1], w_tuned[y].to(torch.float32).T).diagonal()
        if _perturb_prologue:
            zpre_b = torch.nextafter(zpre_b, torch.full_like(zpre_b, float("inf")))
            zpre_t = torch.nextafter(zpre_t, torch.full_like(zpre_t, float("-inf")))
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731

    fold = _C.VocabFold(n, topk)
    for c0, c1 in chunks:
        wb_c, wt_c = head_chunk(w_base, c0, c1), head_chunk(w_tuned, c0, c1)
        for r0, r1 in tiles:
            zb = gemm(hb, wb_c, r0, r1, zbuf)
            zt = gemm(ht, wt_c, r0, r1, tbuf)
            fold.fold(zb.data_ptr(), zt.data_ptr(), c1 - c0, r1 - r0, c1 - c0, r0, c0, ptr(targets), ptr(zpre_b), ptr(zpre_t))

    f = lambda: torch.full((n,), float("nan"), dtype=torch.float32)  # noqa: E731
    i = lambda: torch.full((n,), -7, dtype=torch.int64)  # noqa: E731
    lse_b, lse_t, ent_b, ent_t, kl_tb, kl_bt, zb_top = (f() for _ in range(7))
    top_b, top_t, shift = i(), i(), i()
    zy_b, zy_t, gt_b, gt_t, logp_b, logp_t = (f(), f(), i(), i(), f(), f()) if has_t else (None,) * 6
    fold.finalize(*(t.data_ptr() for t in (lse_b, lse_t, ent_b, ent_t, kl_tb, kl_bt, top_b, top_t, zb_top, shift)),
                  *(ptr(t) for t in (zy_b, zy_t, gt_b, gt_t, logp_b, logp_t)))

    # pass 2, only for rows that need it: identical GEMM calls, exact counts against scanned values
    need_s = shift < 0
    need_b = (zpre_b != zy_b) if has_t else torch.zeros(n, dtype=torch.bool)
    need_t = (zpre_t != zy_t) if has_t else torch.zeros(n, dtype=torch.bool)
    need = need_s | need_b | need_t
    rank_b = gt_b + 1 if has_t else None
    rank_t = gt_t + 1 if has_t else None
    if bool(need.any()):
        cnt_s, cnt_b, cnt_t = (torch.zeros(n, dtype=torch.int64) for _ in range(3))
        no_excl = torch.full((n,), -1, dtype=torch.int64)
        act = [m.to(torch.uint8) for m in (need_s, need_b, need_t)]
        todo = [(r0, r1) for r0, r1 in tiles if bool(need[r0:r1].any())]
        for c0, c1 in chunks:
            wb_c = head_chunk(w_base, c0, c1)
            wt_c = head_chunk(w_tuned, c0, c1) if bool(need_t.any()) else None
            for r0, r1 in todo:
                rows, cols = r1 - r0, c1 - c0
                if bool(need_s[r0:r1].any() or need_b[r0:r1].any()):
                    zb = gemm(hb, wb_c, r0, r1, zbuf)
                    if bool(need_s[r0:r1].any()):
                        _C.count_greater(zb.data_ptr(), cols, rows, cols, c0, zb_top[r0:].data_ptr(),
                                         no_excl[r0:].data_ptr(), act[0][r0:].data_ptr(), cnt_s[r0:].data_ptr())
                    if bool(need_b[r0:r1].any()):
                        _C.count_greater(zb.data_ptr(), cols, rows, cols, c0, zy_b[r0:].data_ptr(),
                                         targets[r0:].data_ptr(), act[1][r0:].data_ptr(), cnt_b[r0:].data_ptr())
                if wt_c is not None and bool(need_t[r0:r1].any()):
                    zt = gemm(ht, wt_c, r0, r1, tbuf)
                    _C.count_greater(zt.data_ptr(), cols, rows, cols, c0, zy_t[r0:].data_ptr(),
                                     targets[r0:].data_ptr(), act[2][r0:].data_ptr(), cnt_t[r0:].data_ptr())
        shift = torch.where(need_s, cnt_s + 1, shift)
        if has_t:
            rank_b = torch.where(need_b, cnt_b + 1, rank_b)
            rank_t = torch.where(need_t, cnt_t + 1, rank_t)
    return VocabProbeResult(
        kl_tb=kl_tb, kl_bt=kl_bt, logp_base=logp_b, logp_tuned=logp_t,
        rank_base=rank_b, rank_tuned=rank_t, top_base=top_b, top_tuned=top_t, rank_shift_top=shift,
        entropy_base=ent_b, entropy_tuned=ent_t, lse_base=lse_b, lse_tuned=lse_t,
    )


# ---------------------------------------------------------------------------------------- reference


def vocab_probe_torch(
    h_base: torch.Tensor,
    w_base: torch.Tensor,
    h_tuned: torch.Tensor,
    w_tuned: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    valid_vocab: int | None = None,
) -> VocabProbeResult:
    """fp32 reference, written to be obviously right: full [N, V] logits for both models.

    Roofline (per call, both models, N tokens, V vocab, d hidden): 4·N·V·d FLOPs for the two GEMMs
    (the floor every backend pays); bytes ≈ 2·V·d·sizeof(w) + 2·N·d·sizeof(h) for the fused kernels,
    plus ≈ 2·N·V·4 · (1 write + ~6 reads) here, because every step below materializes [N, V] fp32.
    Peak extra memory here is ≈ 6·N·V·4 bytes; the fused backends need O(tile·chunk + N·k).
    """
    w_base, w_tuned, targets, _ = _check_inputs(h_base, w_base, h_tuned, w_tuned, targets, valid_vocab)
    zb = h_base.float() @ w_base.float().T  # [N, V] base logits
    zt = h_tuned.float() @ w_tuned.float().T  # [N, V] tuned logits
    lq = torch.log_softmax(zb, dim=-1)  # log q
    lp = torch.log_softmax(zt, dim=-1)  # log p
    q, p = lq.exp(), lp.exp()
    top_b = zb.argmax(-1)  # first maximal index = lowest id on ties
    top_t = zt.argmax(-1)
    zb_at_top_t = zb.gather(1, top_t[:, None])
    res = VocabProbeResult(
        kl_tb=(p * (lp - lq)).sum(-1),
        kl_bt=(q * (lq - lp)).sum(-1),
        logp_base=None, logp_tuned=None, rank_base=None, rank_tuned=None,
        top_base=top_b, top_tuned=top_t,
        rank_shift_top=1 + (zb > zb_at_top_t).sum(-1),
        entropy_base=-(q * lq).sum(-1),
        entropy_tuned=-(p * lp).sum(-1),
        lse_base=torch.logsumexp(zb, -1),
        lse_tuned=torch.logsumexp(zt, -1),
    )
    if targets is not None:
        y = targets[:, None]
        res.logp_base = lq.gather(1, y)[:, 0]
        res.logp_tuned = lp.gather(1, y)[:, 0]
        res.rank_base = 1 + (zb > zb.gather(1, y)).sum(-1)
        res.rank_tuned = 1 + (zt > zt.gather(1, y)).sum(-1)
    return res
