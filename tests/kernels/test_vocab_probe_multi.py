"""vocab_probe with J tuned heads in one call: each result equals its single-pair call (bit for bit on the cpp and
torch backends, whose calls are the same ones) and the fp32 reference, on random and adversarial inputs."""
from __future__ import annotations

import pytest
import torch

from driftscope.kernels import use_backend
from test_vocab_probe import FLOAT_FIELDS, INT_FIELDS, Case, make_inputs, vp


def _tuned_set(case: Case, j: int):
    """Base inputs and J tuned (h, w): J-1 from other seeds plus, for j >= 3, the mirrored head w_t = -w_b (its
    top-1 is the base's bottom-1: every rank_shift_top is the vocabulary's far end, a reference-free identity)."""
    hb, wb, ht, wt, y = make_inputs(case, seed=0)
    hts, wts = [ht], [wt]
    for s in range(1, j):
        _, _, h, w, _ = make_inputs(case, seed=s)
        hts.append(h)
        wts.append(w)
    if j >= 3:
        hts[2], wts[2] = hb.clone(), -wb
    return hb, wb, hts, wts, y


def _assert_equal(a, b, what: str) -> None:
    for f in (*FLOAT_FIELDS, *INT_FIELDS):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f"{what}: {f}"
        if x is not None:
            assert torch.equal(x, y), f"{what}: {f} differs ({(x != y).sum()} of {x.numel()})"


CASES = [Case(37, 1000, 64), Case(37, 1000, 48, kind="ties"), Case(21, 700, 40, torch.bfloat16),
         Case(37, 1000, 64, kind="scale1e4")]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_j_heads_in_one_call_equal_j_single_calls_bitwise(backend, case):
    hb, wb, hts, wts, y = _tuned_set(case, 4)
    with use_backend(backend):
        many = vp.vocab_probe(hb, wb, hts, wts, y)
        singles = [vp.vocab_probe(hb, wb, h, w, y) for h, w in zip(hts, wts)]
    assert isinstance(many, list) and len(many) == 4
    for j, (a, b) in enumerate(zip(many, singles)):
        _assert_equal(a, b, f"{backend} tuned {j}")


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.id)
def test_cpp_j_heads_match_the_reference_and_the_mirror_identity(case):
    hb, wb, hts, wts, y = _tuned_set(case, 3)
    with use_backend("cpp"):
        got = vp.vocab_probe(hb, wb, hts, wts, y, valid_vocab=None)
    ref = vp.vocab_probe_torch(hb, wb, hts, wts, y)
    for j, (a, r) in enumerate(zip(got, ref)):
        for f in INT_FIELDS:
            assert torch.equal(getattr(a, f), getattr(r, f)), f"tuned {j}: {f}"
        for f in FLOAT_FIELDS:
            torch.testing.assert_close(getattr(a, f), getattr(r, f), rtol=1e-4, atol=2e-5, msg=f"tuned {j}: {f}")
    # mirrored head: the tuned top-1 is the base's lowest logit, so its base rank counts every larger one
    zb = hb.float() @ wb.float().T
    bottom = zb.gather(1, got[2].top_tuned[:, None])
    assert torch.equal(got[2].rank_shift_top, 1 + (zb > bottom).sum(-1))
    if case.kind != "ties":  # distinct logits: the mirror's top-1 is the base's unique minimum
        assert torch.equal(got[2].top_tuned, zb.argmin(-1))


def test_j_heads_with_cut_vocabularies_and_forced_recount():
    hb, wb, hts, wts, y = _tuned_set(Case(33, 900, 32), 3)
    wts = [torch.cat([w, torch.randn(7, w.shape[1])]) for w in wts]  # padded heads: only valid_vocab ids count
    with use_backend("cpp"):
        many = vp.vocab_probe_cpp(hb, wb, hts, [w[:900] for w in wts], y, tile=8, chunk=128, topk=2,
                                   _perturb_prologue=True)
        singles = [vp.vocab_probe_cpp(hb, wb, h, w[:900], y, tile=8, chunk=128, topk=2, _perturb_prologue=True)
                   for h, w in zip(hts, wts)]
        via_api = vp.vocab_probe(hb, wb, hts, wts, y, valid_vocab=900)
    for j in range(3):
        _assert_equal(many[j], singles[j], f"forced recount, tuned {j}")
        _assert_equal(via_api[j], vp.vocab_probe(hb, wb, hts[j], wts[j], y, valid_vocab=900), f"api, tuned {j}")
    ref = vp.vocab_probe_torch(hb, wb, hts, [w[:900] for w in wts], y)
    for a, r in zip(many, ref):
        for f in INT_FIELDS:
            assert torch.equal(getattr(a, f), getattr(r, f)), f


def test_triton_j_heads_equal_single_calls(triton_device):
    case = Case(9, 300, 32)
    hb, wb, hts, wts, y = (t.to(triton_device) if torch.is_tensor(t) else [x.to(triton_device) for x in t]
                           for t in _tuned_set(case, 3))
    with use_backend("triton"):
        many = vp.vocab_probe(hb, wb, hts, wts, y)
        singles = [vp.vocab_probe(hb, wb, h, w, y) for h, w in zip(hts, wts)]
    for j, (a, b) in enumerate(zip(many, singles)):
        _assert_equal(a, b, f"triton tuned {j}")
    ref = vp.vocab_probe_torch(hb.cpu(), wb.cpu(), [h.cpu() for h in hts], [w.cpu() for w in wts], y.cpu())
    for a, r in zip(many, ref):
        for f in INT_FIELDS:
            assert torch.equal(getattr(a, f).cpu(), getattr(r, f)), f


def test_bad_sequences_are_refused():
    hb, wb, hts, wts, y = _tuned_set(Case(5, 100, 8), 2)
    with pytest.raises(ValueError, match="same nonzero length"):
        vp.vocab_probe(hb, wb, hts, wts[:1], y)
    with pytest.raises(ValueError, match="same nonzero length"):
        vp.vocab_probe(hb, wb, hts, wts[0], y)
    with pytest.raises(ValueError, match="same nonzero length"):
        vp.vocab_probe(hb, wb, [], [], y)
    with pytest.raises(ValueError, match="tuned model 1: h_base has 5 tokens but h_tuned has 4"):
        vp.vocab_probe(hb, wb, [hts[0], hts[1][:4]], wts, y)
    empty = vp.vocab_probe(hb[:0], wb, [h[:0] for h in hts], wts, y[:0])
    assert len(empty) == 2 and empty[0].kl_tb.shape == (0,)


def test_the_second_pass_recomputes_each_base_tile_once_for_all_pairs(monkeypatch):
    cpp = __import__("driftscope.kernels.vocab_probe.cpp", fromlist=["_recount_gemm"])
    hb, wb, hts, wts, y = _tuned_set(Case(33, 900, 32), 3)
    wts = [-wb for _ in wts]  # mirrored: every rank_shift_top is far beyond the top-k, every row is recounted
    calls = {"base": 0, "tuned": 0}
    real = cpp._recount_gemm

    def counting(h, *a):
        calls["base" if h.data_ptr() == hb.data_ptr() else "tuned"] += 1
        return real(h, *a)

    monkeypatch.setattr(cpp, "_recount_gemm", counting)
    many = cpp.vocab_probe_cpp(hb, wb, hts, wts, y, tile=8, chunk=128, topk=2, panel_bytes=0)
    tiles, chunks = -(-33 // 8), -(-900 // 128)
    assert calls["base"] == tiles * chunks, calls  # once per (tile, chunk), not once per tuned model
    singles = [cpp.vocab_probe_cpp(hb, wb, h, w, y, tile=8, chunk=128, topk=2, panel_bytes=0)
               for h, w in zip(hts, wts)]
    for j, (a, b) in enumerate(zip(many, singles)):
        _assert_equal(a, b, f"shared second pass, tuned {j}")


def test_the_base_panel_makes_the_second_pass_unneeded(monkeypatch):
    """Mirrored heads put every rank_shift_top beyond the top-2: with the stored base panel they are counted on it
    (no GEMM is repeated, without targets nothing else needs the second pass), equal to the second pass's counts
    and to the reference; a budget below one [tile, V] panel falls back to the second pass."""
    cpp = __import__("driftscope.kernels.vocab_probe.cpp", fromlist=["_recount_gemm"])
    hb, wb, hts, _, _ = _tuned_set(Case(33, 900, 32), 2)
    wts = [-wb, wb.flip(0)]
    calls = []
    real = cpp._recount_gemm
    monkeypatch.setattr(cpp, "_recount_gemm", lambda *a: calls.append(1) or real(*a))
    panel = cpp.vocab_probe_cpp(hb, wb, hts, wts, None, tile=8, chunk=128, topk=2, panel_bytes=8 * 900 * 4)
    assert calls == []
    second = cpp.vocab_probe_cpp(hb, wb, hts, wts, None, tile=8, chunk=128, topk=2, panel_bytes=8 * 900 * 4 - 1)
    assert calls, "a budget below one panel must use the second pass"
    for j, (a, b) in enumerate(zip(panel, second)):
        _assert_equal(a, b, f"panel vs second pass, tuned {j}")
        want = vp.vocab_probe_torch(hb, wb, hts[j], wts[j])
        assert torch.equal(a.rank_shift_top, want.rank_shift_top) and torch.equal(a.top_tuned, want.top_tuned)


def test_the_reference_workspace_is_reused_without_changing_any_result():
    """The torch backend keeps its [rows, V] logit buffers between calls (CPU): calls of other sizes and J in
    between, and calls from several threads at once, give the results of calls on a fresh workspace; the results
    are not views of the buffers; at most (1 + J) buffers of the largest call are kept."""
    from concurrent.futures import ThreadPoolExecutor

    from driftscope.kernels.vocab_probe import reference as ref

    big, small = _tuned_set(Case(300, 500, 32), 4), _tuned_set(Case(7, 500, 32, kind="ties"), 2)

    def fresh(args):
        ref._workspace.clear()
        return ref.vocab_probe_torch(*args)

    want_big, want_small = fresh(big), fresh(small)
    ref._workspace.clear()
    got_small = ref.vocab_probe_torch(*small)
    got_big = ref.vocab_probe_torch(*big)
    again_small = ref.vocab_probe_torch(*small)  # reuses buffers the J = 4 call wrote
    for j in range(4):
        _assert_equal(got_big[j], want_big[j], f"big {j}")
    for j in range(2):
        _assert_equal(got_small[j], want_small[j], f"small {j} (first)")  # not overwritten by the later calls
        _assert_equal(again_small[j], want_small[j], f"small {j} (reused)")
    kept = ref._workspace._free[500]
    assert len(kept) == 5 and all(b.shape[0] == ref.BLOCK for b in kept)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda a: ref.vocab_probe_torch(*a), [big, small] * 4))
    for out, want in zip(outs, [want_big, want_small] * 4):
        for a, b in zip(out, want):
            _assert_equal(a, b, "threaded")
    assert len(ref._workspace._free[500]) <= 5
    ref.release_workspace()
    assert not ref._workspace._free


def _pair_set(case: Case):
    """Four sources over one vocabulary and pairs that share them: a source on both sides, a base side read by two
    pairs, a pair of a source with itself, and the mirrored head (every rank_shift_top beyond the top-k)."""
    hb, wb, hts, wts, y = _tuned_set(case, 3)
    sources = [(hb, wb), (hts[0], wts[0]), (hts[1], wts[1]), (hts[2], wts[2])]
    return sources, [(0, 1), (0, 2), (1, 2), (2, 0), (3, 3), (0, 3)], y


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pairs_over_shared_sources_equal_single_calls_bitwise(backend, case):
    sources, pairs, y = _pair_set(case)
    with use_backend(backend):
        got = vp.vocab_probe_pairs(sources, pairs, y)
        singles = [vp.vocab_probe(*sources[a], *sources[b], y) for a, b in pairs]
    for p, (a, b) in enumerate(zip(got, singles)):
        _assert_equal(a, b, f"{backend} pair {pairs[p]}")
    same = got[4]  # a source against itself: KL 0 and rank_shift_top 1 exactly, both sides equal
    assert torch.equal(same.kl_tb, torch.zeros_like(same.kl_tb)) and torch.equal(same.kl_bt, same.kl_tb)
    assert torch.equal(same.rank_shift_top, torch.ones_like(same.rank_shift_top))
    assert torch.equal(same.rank_base, same.rank_tuned) and torch.equal(same.lse_base, same.lse_tuned)


def test_cpp_pairs_compute_each_source_once_per_tile_and_chunk_and_recount_exactly(monkeypatch):
    """Each used source's logits once per (tile, chunk) whatever the number of pairs reading it; with the panels
    off, a forced recount (one-ulp prologues, top-2 lists) still equals the single calls and the reference."""
    cpp = __import__("driftscope.kernels.vocab_probe.cpp", fromlist=["_gemm"])
    sources, pairs, y = _pair_set(Case(33, 900, 32))
    hs, ws = [h for h, _ in sources], [w for _, w in sources]
    calls: dict[int, int] = {}
    real = cpp._gemm

    def counting(h, *a):
        calls[h.data_ptr()] = calls.get(h.data_ptr(), 0) + 1
        return real(h, *a)

    monkeypatch.setattr(cpp, "_gemm", counting)
    for budget in (0, 2 * 8 * 900 * 4, None):  # no panel, panels for the first two base sides, all
        calls.clear()
        got = cpp.vocab_probe_cpp_pairs(hs, ws, pairs, y, tile=8, chunk=128, topk=2, panel_bytes=budget,
                                        _perturb_prologue=True)
        assert sorted(calls.values()) == [5 * 8] * 4, calls  # 5 tiles x 8 chunks per source
        for p, (a, b) in enumerate(pairs):
            one = cpp.vocab_probe_cpp(hs[a], ws[a], hs[b], ws[b], y, tile=8, chunk=128, topk=2, panel_bytes=budget,
                                      _perturb_prologue=a != b)
            if a != b:  # (a, a): its prologue moves both ways in a single call, one way here: the recount decides
                _assert_equal(got[p], one, f"budget {budget}, pair {pairs[p]}")
            want = vp.vocab_probe_torch(hs[a], ws[a], hs[b], ws[b], y)
            for f in INT_FIELDS:
                assert torch.equal(getattr(got[p], f), getattr(want, f)), (budget, pairs[p], f)


def test_bad_pairs_are_refused():
    sources, _, y = _pair_set(Case(5, 100, 8))
    for pairs in ([], [(0, 4)], [(0,)], [(0, -1)]):
        with pytest.raises(ValueError, match="pairs must be a nonempty list"):
            vp.vocab_probe_pairs(sources, pairs, y)
    with pytest.raises(ValueError, match=r"sources\[4\] has 3 tokens on cpu, sources\[0\] 5 on cpu"):
        vp.vocab_probe_pairs([*sources, (sources[0][0][:3], sources[0][1])], [(0, 1), (4, 4)], y)
    with pytest.raises(ValueError, match="pair 1: its vocabulary has 99 ids, pair 0's 100"):
        vp.vocab_probe_pairs([*sources, (sources[0][0], sources[0][1][:99])], [(0, 1), (4, 4)], y)
    with pytest.raises(ValueError, match="pair 1: vocabulary sizes differ: w_base has 100 rows, w_tuned has 99"):
        vp.vocab_probe_pairs([*sources, (sources[0][0], sources[0][1][:99])], [(0, 1), (0, 4)], y)


def test_triton_pairs_equal_single_calls(triton_device):
    sources, pairs, y = _pair_set(Case(9, 300, 32))
    sources, y = [(h.to(triton_device), w.to(triton_device)) for h, w in sources], y.to(triton_device)
    with use_backend("triton"):
        got = vp.vocab_probe_pairs(sources, pairs, y)
        singles = [vp.vocab_probe(*sources[a], *sources[b], y) for a, b in pairs]
    for p, (a, b) in enumerate(zip(got, singles)):
        _assert_equal(a, b, f"triton pair {pairs[p]}")


def test_the_cpp_fold_refuses_bad_arguments_by_name():
    """driftscope._C.VocabFold (the launcher checks shapes first; the fold still names what it was given wrong)."""
    _C = pytest.importorskip("driftscope._C")
    with pytest.raises(ValueError, match="pairs must not be empty"):
        _C.VocabFold(4, 2, [])
    with pytest.raises(ValueError, match=r"pair \(0, -1\) has a negative source index"):
        _C.VocabFold(4, 2, [(0, -1)])
    fold = _C.VocabFold(4, 2, [(0, 2), (1, 2)])
    assert (fold.n_sources, fold.n_pairs) == (3, 2)
    z = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="expected 3 source tiles, got 2"):
        fold.fold([z.data_ptr()] * 2, 8, 4, 8, 0, 0, 0, [])
    with pytest.raises(ValueError, match="targets given without one zpre per source"):
        fold.fold([z.data_ptr()] * 3, 8, 4, 8, 0, 0, torch.zeros(4, dtype=torch.int64).data_ptr(), [])
    with pytest.raises(ValueError, match="pair 2 out of range for 2"):
        fold.finalize(2, z.data_ptr(), z.data_ptr())
