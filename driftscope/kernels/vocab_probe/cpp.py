"""cpp backend (CPU): torch GEMM per (vocab chunk, token tile) into fp32 buffers, folded by driftscope._C;
`_cpp_tile_sizes` picks the tile and chunk."""
from __future__ import annotations

import os

import torch

from driftscope.kernels.linear import cpu_gemm, onednn_gemm
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
    """[r1 - r0, chunk] logits: into `buf` by MKL, or a new tensor by oneDNN where kernels.linear picks it."""
    if onednn_gemm():
        return cpu_gemm(h[r0:r1], w_c)
    out = buf[: (r1 - r0) * w_c.shape[0]].view(r1 - r0, w_c.shape[0])
    torch.matmul(h[r0:r1], w_c.T, out=out)
    return out


def _target_logits(h, w_y):  # [tile, d] x [tile, d] -> [tile]: the diagonal of the tile GEMM, by the probe's GEMM
    return (cpu_gemm(h, w_y) if onednn_gemm() else torch.matmul(h, w_y.T)).diagonal()


_recount_gemm = _gemm  # pass 2's GEMM: the same call, under its own name so that tests can make it differ


def _panel_bytes(explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    raw = os.environ.get("DRIFTSCOPE_CPP_PANEL_MIB", "512")
    try:
        return int(float(raw) * 2**20)
    except ValueError:
        raise ValueError(f"DRIFTSCOPE_CPP_PANEL_MIB={raw!r}: expected a number of MiB (0: no panel)") from None


def _panel_shift(fold, p, panel, r0, r1, chunks, out):
    """out[r] = pair p's rank_shift_top of rows [r0, r1) (all their chunks folded): from the top-k list, else 1 +
    the count of the tile's stored base logits (`panel[c0]`: chunk c0's [rows, cols]) above the base logit at the
    tuned top-1."""
    from driftscope import _C

    rows = r1 - r0
    top, thr = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.float32)
    fold.tuned_top(p, r0, rows, top.data_ptr(), thr.data_ptr(), out.data_ptr())
    need = out < 0
    if not bool(need.any()):
        return
    act, cnt = need.to(torch.uint8), torch.zeros(rows, dtype=torch.int64)
    for c0, c1 in chunks:  # the own column is excluded; it is not above itself anyway
        _C.count_greater(panel[c0].data_ptr(), c1 - c0, rows, c1 - c0, c0, thr.data_ptr(), top.data_ptr(),
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
    `panel_bytes` caps the [tile, V] fp32 base panels (default: DRIFTSCOPE_CPP_PANEL_MIB, 512 MiB; 0: no panel,
    rank_shift_top then recounted in the second pass). Peak memory is O(tile · V) with the panel, O(tile · chunk)
    without, never O(N · V).
    `_perturb_prologue` (tests only) nudges the pre-known target logits by one ulp to exercise the exact
    recount of rows whose prologue logit is not the scanned one."""
    many = isinstance(h_tuned, (list, tuple))
    hts, wts = (list(h_tuned), list(w_tuned)) if many else ([h_tuned], [w_tuned])
    out = vocab_probe_cpp_pairs([h_base, *hts], [w_base, *wts], [(0, j + 1) for j in range(len(hts))], targets,
                                tile, chunk, topk, panel_bytes, _perturb_prologue)
    return out if many else out[0]


def vocab_probe_cpp_pairs(hs, ws, pairs, targets, tile: int | None = None, chunk: int | None = None, topk: int = 32,
                          panel_bytes: int | None = None, _perturb_prologue: bool = False):
    """Many pairs over shared sources: `hs[s]`, `ws[s]` the states [N, d_s] and head [V, d_s] of source s, `pairs`
    (a, b) = (base side, tuned side) indices into them; one result per pair, each equal bit for bit to
    `vocab_probe_cpp(hs[a], ws[a], hs[b], ws[b], targets)` (every GEMM call is that call's). Each source's logits
    are computed once per (tile, chunk) whatever the number of pairs reading them (the logit lens: its cross and
    self pairs share each model's lens logits), its target logits once; a panel per base-side source, those most
    pairs read first, while they fit `panel_bytes` together. `vocab_probe_cpp` is sources = (base, tuned...)."""
    from driftscope import _C

    used = sorted({s for p in pairs for s in p})  # sources no pair reads are never touched
    n, vocab = hs[used[0]].shape[0], ws[used[0]].shape[0]
    assert all(ws[s].shape[0] == vocab for s in used), "the pairs' heads must be cut to one vocabulary"
    dt_tile, dt_chunk = _cpp_tile_sizes(n, vocab)
    tile, chunk = tile or dt_tile, min(chunk or dt_chunk, vocab)
    assert tile >= 1 and chunk >= 1
    hs = [h.float().contiguous() if s in used else None for s, h in enumerate(hs)]  # no copy for contiguous fp32
    has_t = targets is not None
    tiles = [(r0, min(n, r0 + tile)) for r0 in range(0, n, tile)]
    chunks = [(c0, min(vocab, c0 + chunk)) for c0 in range(0, vocab, chunk)]

    def head_chunk(s, c0, c1):  # [c1-c0, d] fp32 (a view when the head is fp32 with unit column stride)
        return ws[s][c0:c1].to(torch.float32)

    def prologue(h, w):  # target logits by the same BLAS, [tile, tile] -> diagonal
        z = torch.empty(n, dtype=torch.float32)
        for r0, r1 in tiles:
            z[r0:r1] = _target_logits(h[r0:r1], w[targets[r0:r1]].to(torch.float32))
        return z

    zpre = {s: prologue(hs[s], ws[s]) for s in used} if has_t else dict.fromkeys(used)
    if has_t and _perturb_prologue:  # base sides up one ulp, tuned sides down (a source on both sides: up)
        for s in used:
            zpre[s] = torch.nextafter(zpre[s], torch.full_like(zpre[s], float("inf" if any(
                a == s for a, _ in pairs) else "-inf")))
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731

    # Token tiles outermost: a tile's base logits over the whole vocabulary stay in its source's panel (while the
    # panels fit the budget), so each pair's rank_shift_top undecided by the top-k list is counted there, on the
    # scanned values, before the next tile: no second base GEMM. Sources without a panel use a [tile, chunk] buffer;
    # the rows their pairs leave undecided go to the second pass.
    # A panel: the [tile, V] memory chunk c0's GEMM writes into at tile·c0 (MKL), or the chunks' own tensors (oneDNN).
    budget, panels, sides, own = _panel_bytes(panel_bytes), {}, [a for a, _ in pairs], onednn_gemm()
    for a in sorted(dict.fromkeys(sides), key=lambda a: -sides.count(a)):  # the base sides most pairs read first
        if (len(panels) + 1) * tile * vocab * 4 <= budget:
            panels[a] = None if own else torch.empty(tile * vocab, dtype=torch.float32)
    bufs = {s: None if own else torch.empty(tile * chunk, dtype=torch.float32) for s in used if s not in panels}
    local = {s: i for i, s in enumerate(used)}  # the fold's source index of each used source
    fold = _C.VocabFold(n, topk, [(local[a], local[b]) for a, b in pairs])
    zpre_ptrs = [ptr(zpre[s]) for s in used] if has_t else []
    shifts = [torch.full((n,), -1, dtype=torch.int64) for _ in pairs]
    kept: dict[int, dict[int, torch.Tensor]] = {a: {} for a in panels}  # panel source -> chunk -> its logits
    for r0, r1 in tiles:
        for c0, c1 in chunks:
            for a in panels:  # the last tile's chunk goes just before its successor comes: the allocator reuses it
                kept[a].pop(c0, None)
            z = {s: _gemm(hs[s], head_chunk(s, c0, c1), r0, r1,
                          bufs[s] if s not in panels else None if own else panels[s][tile * c0:]) for s in used}
            for a in panels:
                kept[a][c0] = z[a]
            fold.fold([z[s].data_ptr() for s in used], c1 - c0, r1 - r0, c1 - c0, r0, c0, ptr(targets), zpre_ptrs)
            del z
        for p, (shift, (a, _)) in enumerate(zip(shifts, pairs)):
            if a in panels:
                _panel_shift(fold, p, kept[a], r0, r1, chunks, shift[r0:r1])
    kept.clear()
    states = [_finalize(fold, p, n, has_t) for p in range(len(pairs))]
    for st, shift, (a, _) in zip(states, shifts, pairs):
        if a in panels:  # every row's shift, from the top-k list or counted on the panel
            st["shift"] = shift
    panels.clear()  # freed before the second pass's buffers
    shared = _SharedRecount(n, hs, pairs, targets, zpre, states, tiles, chunks, bufs, head_chunk)
    return [_merge_recount(
        lambda ns, nb, nt, p=p: shared.counts(p), st["shift"], st["gt_b"], st["gt_t"], zpre[a], zpre[b],
        st["zy_b"], st["zy_t"], zb_top=st["zb_top"], heads=(hs[a], ws[a], hs[b], ws[b]), targets=targets,
        **{m.name: st[m.name] for m in METRICS if m.name in st}) for p, (st, (a, b)) in enumerate(zip(states, pairs))]


def _finalize(fold, p: int, n: int, has_t: bool) -> dict:
    """Pair p's per-row results from the fold (names as VocabProbeResult, plus the scan's raw rank state): rows
    of the packed buffers the fold writes, by the names it gives them; the target ones None without targets."""
    outf = torch.empty((len(fold.float_fields()), n), dtype=torch.float32)
    outi = torch.empty((len(fold.int_fields()), n), dtype=torch.int64)
    fold.finalize(p, outf.data_ptr(), outi.data_ptr())
    st = dict(zip(fold.float_fields(), outf)) | dict(zip(fold.int_fields(), outi))
    no_t = {m.name for m in METRICS if m.targets} | {"zy_b", "zy_t", "gt_b", "gt_t"}
    return st if has_t else {k: None if k in no_t else t for k, t in st.items()}


class _SharedRecount:
    """The second pass for every pair at once: each source tile some pair needs is recomputed once for all pairs
    (identical GEMM calls, so the scan's bits). `counts(p)` gives pair p what `_merge_recount` asks of its recount:
    the counts against the scanned values, each reference column excluded, and the recomputed logits at those
    columns. The needs are `_merge_recount`'s own (shift < 0 over the pair's base side; prologue logit != scanned
    logit, per source: every pair reading a source scanned the same values)."""

    def __init__(self, n, hs, pairs, targets, zpre, states, tiles, chunks, bufs, head_chunk):
        self.args = (n, hs, pairs, targets, zpre, states, tiles, chunks, bufs, head_chunk)
        self.out: list | None = None

    def counts(self, p: int):
        if self.out is None:
            self.out = self._run(*self.args)
        return self.out[p]

    @staticmethod
    def _run(n, hs, pairs, targets, zpre, states, tiles, chunks, bufs, head_chunk):
        from driftscope import _C

        has_t = targets is not None
        zeros = lambda: torch.zeros(n, dtype=torch.int64)  # noqa: E731
        nans = lambda: torch.full((n,), float("nan"), dtype=torch.float32)  # noqa: E731
        zy = {}  # source -> its scanned target logits (any pair reading it)
        for st, (a, b) in zip(states, pairs):
            zy.setdefault(a, st["zy_b"])
            zy.setdefault(b, st["zy_t"])
        none = torch.zeros(n, dtype=torch.bool)
        need_y = {s: (zpre[s] != z) if has_t else none for s, z in zy.items()}
        need_s = [st["shift"] < 0 for st in states]
        cnt_s, re_s = [zeros() for _ in pairs], [nans() for _ in pairs]
        cnt_y, re_y = {s: zeros() for s in zy}, {s: nans() for s in zy}
        act_s, act_y = [m.to(torch.uint8) for m in need_s], {s: m.to(torch.uint8) for s, m in need_y.items()}
        need = {s: torch.stack([need_y[s], *(m for m, (a, _) in zip(need_s, pairs) if a == s)]).any(0) for s in zy}
        todo = {s: [(r0, r1) for r0, r1 in tiles if bool(m[r0:r1].any())] for s, m in need.items()}
        size = tiles[0][1] * (chunks[0][1] - chunks[0][0])
        work = {s: bufs.get(s) if s in bufs or onednn_gemm() else torch.empty(size) for s, t in todo.items() if t}
        for c0, c1 in chunks:
            cols = c1 - c0
            for s, rows in todo.items():
                if not rows:
                    continue
                w_c = head_chunk(s, c0, c1)
                for r0, r1 in rows:
                    z = _recount_gemm(hs[s], w_c, r0, r1, work[s])
                    for p, (st, (a, _)) in enumerate(zip(states, pairs)):
                        if a == s and bool(need_s[p][r0:r1].any()):  # the tuned top-1's own column excluded
                            _C.count_greater(z.data_ptr(), cols, r1 - r0, cols, c0, st["zb_top"][r0:].data_ptr(),
                                             st["top_tuned"][r0:].data_ptr(), act_s[p][r0:].data_ptr(),
                                             cnt_s[p][r0:].data_ptr())
                            _take(z, st["top_tuned"][r0:r1], c0, re_s[p][r0:r1])
                    if bool(need_y[s][r0:r1].any()):
                        _C.count_greater(z.data_ptr(), cols, r1 - r0, cols, c0, zy[s][r0:].data_ptr(),
                                         targets[r0:].data_ptr(), act_y[s][r0:].data_ptr(), cnt_y[s][r0:].data_ptr())
                        _take(z, targets[r0:r1], c0, re_y[s][r0:r1])
        return [((cnt_s[p], cnt_y[a], cnt_y[b]), (re_s[p], re_y[a], re_y[b])) for p, (a, b) in enumerate(pairs)]
