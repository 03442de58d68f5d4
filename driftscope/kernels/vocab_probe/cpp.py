"""cpp backend (CPU): torch GEMM per (vocab chunk, token tile) into fp32 buffers, folded by driftscope._C;
`_cpp_tile_sizes` picks the tile and chunk."""
from __future__ import annotations

import os

import torch

from driftscope.kernels.vocab_probe.common import METRICS, _merge_recount


def _cpp_tile_sizes(n: int, vocab: int) -> tuple[int, int]:
    """Token tile × vocab chunk: 256 × 16,384 (fp32 tiles of 16 MiB per model, out of L2: the fold then reads its
    logits from L3 or DRAM, ~2% of a GEMM's time at d ≥ 576). Chunks this wide because every GEMM call and fold
    ends in an OpenMP barrier, and while other processes share the cores each barrier waits for a descheduled
    thread: with a busy-loop process on each of 2 cores (bench/vocab_contention.py, RESULTS.md) the probe took
    10-18 s with 1,024-wide chunks, 8 s with 4,096 and 6.0-6.9 s with 8,192-32,768, against 8.8-12.2 s for the
    materialized way; quiet, 4,096-32,768 are equal within noise and 1,024 is 10-25% slower."""
    return min(n, 256), min(vocab, 16384)


def _gemm(h, w_c, r0, r1, buf):  # identical call for identical (tile, chunk): same bits in pass 2
    out = buf[: (r1 - r0) * w_c.shape[0]].view(r1 - r0, w_c.shape[0])
    torch.matmul(h[r0:r1], w_c.T, out=out)
    return out


_recount_gemm = _gemm  # pass 2's GEMM: the same call, under its own name so that tests can make it differ


def _panel_bytes(explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    raw = os.environ.get("DRIFTSCOPE_CPP_PANEL_MIB", "512")
    try:
        return int(float(raw) * 2**20)
    except ValueError:
        raise ValueError(f"DRIFTSCOPE_CPP_PANEL_MIB={raw!r}: expected a number of MiB (0: no panel)") from None


def _panel_shift(fold, panel, tile, r0, r1, chunks, out):
    """out[r] = rank_shift_top of rows [r0, r1) (all their chunks folded): from the top-k list, else 1 + the count
    of the tile's stored base logits (panel block at tile·c0 per chunk) above the base logit at the tuned top-1."""
    from driftscope import _C

    rows = r1 - r0
    top, thr = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.float32)
    fold.tuned_top(r0, rows, top.data_ptr(), thr.data_ptr(), out.data_ptr())
    need = out < 0
    if not bool(need.any()):
        return
    act, cnt = need.to(torch.uint8), torch.zeros(rows, dtype=torch.int64)
    for c0, c1 in chunks:  # the own column is excluded; it is not above itself anyway
        _C.count_greater(panel[tile * c0:].data_ptr(), c1 - c0, rows, c1 - c0, c0, thr.data_ptr(), top.data_ptr(),
                         act.data_ptr(), cnt.data_ptr())
    out.copy_(torch.where(need, 1 + cnt, out))


def _take(z, ids, c0, out):
    """out[r] = z[r, ids[r] - c0] for the rows whose id lies in this chunk [c0, c0 + z.shape[1])."""
    j = ids - c0
    inside = (j >= 0) & (j < z.shape[1])
    out.copy_(torch.where(inside, z.gather(1, j.clamp(0, z.shape[1] - 1)[:, None])[:, 0], out))


def vocab_probe_cpp(h_base, w_base, h_tuned, w_tuned, targets, tile: int | None = None, chunk: int | None = None,
                    topk: int = 32, panel_bytes: int | None = None, _perturb_prologue: bool = False):
    """CPU backend: torch GEMM per (chunk, tile) into fp32 buffers, fused fold in driftscope._C.

    `h_tuned`, `w_tuned` may be sequences of J tuned states and heads (then a list of J results): the base
    chunk, its GEMM and its prologue run once per tile for all J, and each tuned tile is folded against it;
    every call is the one a single-pair probe makes, so each result equals its single-pair call bit for bit.
    `panel_bytes` caps the [tile, V] fp32 base panel (default: DRIFTSCOPE_CPP_PANEL_MIB, 512 MiB; 0: no panel,
    rank_shift_top then recounted in the second pass). Peak memory is O(tile · V) with the panel, O(tile · chunk)
    without, never O(N · V).
    `_perturb_prologue` (tests only) nudges the pre-known target logits by one ulp to exercise the exact
    recount of rows whose prologue logit is not the scanned one."""
    from driftscope import _C

    many = isinstance(h_tuned, (list, tuple))
    hts_in, wts = (list(h_tuned), list(w_tuned)) if many else ([h_tuned], [w_tuned])
    n, vocab = h_base.shape[0], w_base.shape[0]
    dt_tile, dt_chunk = _cpp_tile_sizes(n, vocab)
    tile, chunk = tile or dt_tile, min(chunk or dt_chunk, vocab)
    assert tile >= 1 and chunk >= 1
    hb = h_base.float().contiguous()  # [N, d_b]; input-sized copy (no copy for contiguous fp32)
    hts = [h.float().contiguous() for h in hts_in]
    has_t = targets is not None
    zbuf = torch.empty(tile * chunk, dtype=torch.float32)
    tbufs = [torch.empty(tile * chunk, dtype=torch.float32) for _ in hts]
    tiles = [(r0, min(n, r0 + tile)) for r0 in range(0, n, tile)]
    chunks = [(c0, min(vocab, c0 + chunk)) for c0 in range(0, vocab, chunk)]

    def head_chunk(w, c0, c1):  # [c1-c0, d] fp32 (a view when w is fp32 with unit column stride)
        return w[c0:c1].to(torch.float32)

    def prologue(h, w):  # target logits by the same BLAS, [tile, tile] -> diagonal
        z = torch.empty(n, dtype=torch.float32)
        for r0, r1 in tiles:
            z[r0:r1] = torch.matmul(h[r0:r1], w[targets[r0:r1]].to(torch.float32).T).diagonal()
        return z

    zpre_b, zpre_ts = None, [None] * len(hts)
    if has_t:
        zpre_b, zpre_ts = prologue(hb, w_base), [prologue(h, w) for h, w in zip(hts, wts)]
        if _perturb_prologue:
            zpre_b = torch.nextafter(zpre_b, torch.full_like(zpre_b, float("inf")))
            zpre_ts = [torch.nextafter(z, torch.full_like(z, float("-inf"))) for z in zpre_ts]
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731

    # Token tiles outermost: a tile's base logits over the whole vocabulary stay in `panel` (when it fits the
    # budget), so each pair's rank_shift_top undecided by the top-k list is counted there, on the scanned values,
    # before the next tile: no second base GEMM. Without the panel those rows go to the second pass.
    panel = torch.empty(tile * vocab, dtype=torch.float32) if tile * vocab * 4 <= _panel_bytes(panel_bytes) else None
    folds = [_C.VocabFold(n, topk) for _ in hts]
    shifts = [torch.full((n,), -1, dtype=torch.int64) for _ in hts]
    for r0, r1 in tiles:
        for c0, c1 in chunks:
            zb = _gemm(hb, head_chunk(w_base, c0, c1), r0, r1, zbuf if panel is None else panel[tile * c0:])
            for fold, ht, wt, tbuf, zpre_t in zip(folds, hts, wts, tbufs, zpre_ts):
                zt = _gemm(ht, head_chunk(wt, c0, c1), r0, r1, tbuf)
                fold.fold(zb.data_ptr(), zt.data_ptr(), c1 - c0, r1 - r0, c1 - c0, r0, c0,
                          ptr(targets), ptr(zpre_b), ptr(zpre_t))
        if panel is not None:
            for fold, shift in zip(folds, shifts):
                _panel_shift(fold, panel, tile, r0, r1, chunks, shift[r0:r1])
    states = [_finalize(fold, n, has_t) for fold in folds]
    if panel is not None:
        for st, shift in zip(states, shifts):
            st["shift"] = shift
    shared = _SharedRecount(n, hb, w_base, hts, wts, targets, zpre_b, zpre_ts, states, tiles, chunks, zbuf, tbufs,
                            head_chunk)
    results = [_merge_recount(
        lambda ns, nb, nt, j=j: shared.counts(j), st["shift"], st["gt_b"], st["gt_t"], zpre_b, zpre_ts[j],
        st["zy_b"], st["zy_t"], zb_top=st["zb_top"], heads=(hb, w_base, hts[j], wts[j]), targets=targets,
        **{m.name: st[m.name] for m in METRICS if m.name in st}) for j, st in enumerate(states)]
    return results if many else results[0]


def _finalize(fold, n: int, has_t: bool) -> dict:
    """One pair's per-row results from its fold (names as VocabProbeResult, plus the scan's raw rank state): rows
    of the packed buffers the fold writes, by the names it gives them; the target ones None without targets."""
    outf = torch.empty((len(fold.float_fields()), n), dtype=torch.float32)
    outi = torch.empty((len(fold.int_fields()), n), dtype=torch.int64)
    fold.finalize(outf.data_ptr(), outi.data_ptr())
    st = dict(zip(fold.float_fields(), outf)) | dict(zip(fold.int_fields(), outi))
    no_t = {m.name for m in METRICS if m.targets} | {"zy_b", "zy_t", "gt_b", "gt_t"}
    return st if has_t else {k: None if k in no_t else t for k, t in st.items()}


class _SharedRecount:
    """The second pass for every pair at once: each base tile a pair needs is recomputed once for all pairs
    (identical GEMM calls, so the scan's bits), each tuned tile for its own pair. `counts(j)` gives pair j what
    `_merge_recount` asks of its recount: the counts against the scanned values, each reference column
    excluded, and the recomputed logits at those columns. The needs are `_merge_recount`'s own (shift < 0,
    prologue logit != scanned logit)."""

    def __init__(self, n, hb, w_base, hts, wts, targets, zpre_b, zpre_ts, states, tiles, chunks, zbuf, tbufs,
                 head_chunk):
        self.args = (n, hb, w_base, hts, wts, targets, zpre_b, zpre_ts, states, tiles, chunks, zbuf, tbufs,
                     head_chunk)
        self.out: list | None = None

    def counts(self, j: int):
        if self.out is None:
            self.out = self._run(*self.args)
        return self.out[j]

    @staticmethod
    def _run(n, hb, w_base, hts, wts, targets, zpre_b, zpre_ts, states, tiles, chunks, zbuf, tbufs, head_chunk):
        from driftscope import _C

        has_t = targets is not None
        zeros = lambda: torch.zeros(n, dtype=torch.int64)  # noqa: E731
        nans = lambda: torch.full((n,), float("nan"), dtype=torch.float32)  # noqa: E731
        need_s = [st["shift"] < 0 for st in states]
        none = torch.zeros(n, dtype=torch.bool)
        need_b = (zpre_b != states[0]["zy_b"]) if has_t else none  # the base scan is the same for every pair
        need_t = [(z != st["zy_t"]) if has_t else none for z, st in zip(zpre_ts, states)]
        cnt_s, re_s = [zeros() for _ in states], [nans() for _ in states]
        cnt_t, re_t = [zeros() for _ in states], [nans() for _ in states]
        cnt_b, re_b = zeros(), nans()
        act_s = [m.to(torch.uint8) for m in need_s]
        act_b, act_t = need_b.to(torch.uint8), [m.to(torch.uint8) for m in need_t]
        base_need = torch.stack([need_b, *need_s]).any(0)
        todo_b = [(r0, r1) for r0, r1 in tiles if bool(base_need[r0:r1].any())]
        todo_t = [[(r0, r1) for r0, r1 in tiles if bool(m[r0:r1].any())] for m in need_t]
        for c0, c1 in chunks:
            cols = c1 - c0
            if todo_b:
                wb_c = head_chunk(w_base, c0, c1)
            for r0, r1 in todo_b:
                zb = _recount_gemm(hb, wb_c, r0, r1, zbuf)
                for j, st in enumerate(states):
                    if bool(need_s[j][r0:r1].any()):  # the tuned top-1's own column excluded
                        _C.count_greater(zb.data_ptr(), cols, r1 - r0, cols, c0, st["zb_top"][r0:].data_ptr(),
                                         st["top_tuned"][r0:].data_ptr(), act_s[j][r0:].data_ptr(),
                                         cnt_s[j][r0:].data_ptr())
                        _take(zb, st["top_tuned"][r0:r1], c0, re_s[j][r0:r1])
                if bool(need_b[r0:r1].any()):
                    _C.count_greater(zb.data_ptr(), cols, r1 - r0, cols, c0, states[0]["zy_b"][r0:].data_ptr(),
                                     targets[r0:].data_ptr(), act_b[r0:].data_ptr(), cnt_b[r0:].data_ptr())
                    _take(zb, targets[r0:r1], c0, re_b[r0:r1])
            for j, st in enumerate(states):
                if not todo_t[j]:
                    continue
                wt_c = head_chunk(wts[j], c0, c1)
                for r0, r1 in todo_t[j]:
                    zt = _recount_gemm(hts[j], wt_c, r0, r1, tbufs[j])
                    _C.count_greater(zt.data_ptr(), cols, r1 - r0, cols, c0, st["zy_t"][r0:].data_ptr(),
                                     targets[r0:].data_ptr(), act_t[j][r0:].data_ptr(), cnt_t[j][r0:].data_ptr())
                    _take(zt, targets[r0:r1], c0, re_t[j][r0:r1])
        return [((cnt_s[j], cnt_b, cnt_t[j]), (re_s[j], re_b, re_t[j])) for j in range(len(states))]
