"""probes.lens: the logit-lens drift against float64 materialized logits, index L against the output probe, J tuned in
one call against J separate ones, merge and state round trips, promoted tokens against a float64 brute force."""
from __future__ import annotations

import pytest
import torch

from driftscope.errors import InputError
from driftscope.kernels.vocab_probe import vocab_probe
from driftscope.probes import TokenMetrics
from driftscope.probes.lens import LensDrift, LensHeads, LensModel, lens_indices, promoted_scores

D, V, L = 24, 97, 4  # hidden size, vocabulary (odd), layers: hidden-state indices 0..L


def rms(gamma: torch.Tensor, eps: float = 1e-6):
    """engine/model.RMSNorm for float32 states."""
    return lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * gamma


def models(n_tuned: int, seed: int = 0) -> LensHeads:
    g = torch.Generator().manual_seed(seed)
    m = lambda: LensModel(None, torch.randn(V, D, generator=g), 1 + 0.1 * torch.randn(D, generator=g))
    base, tuned = m(), [m() for _ in range(n_tuned)]
    for x in (base, *tuned):
        x.norm = rms(x.gamma)
    return LensHeads([0, 2, L], L + 1, base, tuned, [None] * n_tuned)


def batch(n_tuned: int, n: int, seed: int, first_id: int = 0, heads: LensHeads | None = None):
    """States at every index (index L normed, as the runner gives it), targets, sample ids (whole samples), first."""
    g = torch.Generator().manual_seed(seed)
    states = {}
    for i in range(L + 1):
        hb = 2 * torch.randn(n, D, generator=g)
        hts = [hb + torch.randn(n, D, generator=g) for _ in range(n_tuned)]
        if i == L and heads is not None:
            hb, hts = heads.base.norm(hb), [m.norm(h) for m, h in zip(heads.tuned, hts)]
        states[i] = (hb, hts)
    targets = torch.randint(0, V, (n,), generator=g)
    sample_ids = first_id + torch.arange(n) // 3
    first = torch.arange(n) % 3 == 0
    return states, targets, sample_ids, first


def output_results(heads: LensHeads, states, targets):
    hb, hts = states[L]
    return vocab_probe(hb, heads.base.head, hts, [m.head for m in heads.tuned], targets)


def run(heads: LensHeads, batches, outputs: bool = True) -> LensDrift:
    acc = LensDrift(heads.indices, L + 1, len(heads.tuned), D)
    for states, targets, sids, first in batches:
        acc.update(heads, states, targets, sids, first, output_results(heads, states, targets) if outputs else None)
    return acc


@pytest.mark.parametrize("spec, expected", [
    (None, []), ("", []), ("all", [0, 1, 2, 3, 4]), ("every:3", [0, 3, 4]), ("every:2", [0, 2, 4]),
    ("4,0,2,2", [0, 2, 4]), ("every:9", [0, 4]),
])
def test_lens_indices(spec, expected):
    assert lens_indices(spec, L + 1) == expected


@pytest.mark.parametrize("spec", ["every:0", "every:x", "1,,2", "5", "-1", "first"])
def test_lens_indices_refused(spec):
    with pytest.raises(InputError, match="--lens"):
        lens_indices(spec, L + 1)


@pytest.mark.parametrize("outputs", [True, False], ids=["reuse-output", "recompute"])
def test_index_L_equals_the_output_probe(outputs):
    heads = models(2)
    batches = [batch(2, 31, seed=s, first_id=100 * s, heads=heads) for s in range(2)]
    acc = run(heads, batches, outputs)
    for j in range(2):
        ref = TokenMetrics()
        for states, targets, sids, first in batches:
            ref.update(output_results(heads, states, targets)[j], sids, first)
        assert acc.finalize(j)["lens"][-1] == {"index": L, **ref.finalize()}


def test_equal_models_give_zero_kl():
    heads = models(1)
    heads.tuned[0] = heads.base
    states, targets, sids, first = batch(1, 40, seed=3, heads=heads)
    states = {i: (hb, [hb.clone()]) for i, (hb, _) in states.items()}
    acc = run(heads, [(states, targets, sids, first)])
    for row in acc.finalize(0)["lens"]:
        assert row["token_mean"]["kl_tb"] == 0 and row["token_mean"]["kl_bt"] == 0, row["index"]
        assert row["token_mean"]["top1_agree"] == 1 and row["token_mean"]["rank_shift"] == 0


def reference(hb, wb, gb, ht, wt, gt, y, normed: bool) -> dict[str, torch.Tensor]:
    """float64 materialized logits of one pair of states (test only)."""
    norm = lambda h, g: h if normed else h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    zb = norm(hb.double(), gb.double()) @ wb.double().T
    zt = norm(ht.double(), gt.double()) @ wt.double().T
    lq, lp = torch.log_softmax(zb, -1), torch.log_softmax(zt, -1)
    rank = lambda z: 1 + (z > z.gather(1, y[:, None])).sum(-1)
    return {"kl_tb": (lp.exp() * (lp - lq)).sum(-1), "kl_bt": (lq.exp() * (lq - lp)).sum(-1),
            "logp_base": lq.gather(1, y[:, None])[:, 0], "logp_tuned": lp.gather(1, y[:, None])[:, 0],
            "rank_base": rank(zb).double(), "rank_tuned": rank(zt).double(),
            "top1_agree": (zb.argmax(-1) == zt.argmax(-1)).double(),
            "entropy_base": -(lq.exp() * lq).sum(-1), "entropy_tuned": -(lp.exp() * lp).sum(-1)}


def test_against_float64_materialized_logits():
    heads = models(2, seed=4)
    states, targets, sids, first = batch(2, 45, seed=5, heads=heads)
    fin = [run(heads, [(states, targets, sids, first)]).finalize(j) for j in range(2)]
    for j in range(2):
        for k, i in enumerate(heads.indices):
            hb, hts = states[i]
            b, t = heads.base, heads.tuned[j]
            cross = reference(hb, b.head, b.gamma, hts[j], t.head, t.gamma, targets, i == L)
            for name, ref in cross.items():
                got = fin[j]["lens"][k]["token_mean"][name]
                want = float(ref.mean())
                assert got == pytest.approx(want, rel=2e-5, abs=2e-6), (j, i, name, got, want)
            # self-lens of each model: its output (index L) as "base", its lens at i as "tuned"
            for who, m, h in (("base", b, 0), ("tuned", t, 1)):
                out_m = states[L][0] if h == 0 else states[L][1][j]
                at_i = hb if h == 0 else hts[j]
                ref = reference(out_m, m.head, m.gamma, at_i if i == L else m.norm(at_i), m.head, m.gamma, targets,
                                True)
                got = fin[j]["self_lens"][who][k]["token_mean"]
                for name in ("kl_tb", "kl_bt", "logp_base", "logp_tuned", "rank_tuned"):
                    assert got[name] == pytest.approx(float(ref[name].mean()), rel=2e-5, abs=2e-6), (j, i, who, name)
                if i == L:
                    assert got["kl_tb"] == 0 and got["kl_bt"] == 0 and got["rank_shift"] == 0


def test_j_tuned_in_one_call_equal_separate_calls():
    heads = models(3, seed=7)
    batches = [batch(3, 29, seed=s, first_id=50 * s, heads=heads) for s in (1, 2)]
    together = run(heads, batches)
    for j in range(3):
        one = LensHeads(heads.indices, L + 1, heads.base, [heads.tuned[j]], [None])
        alone = run(one, [({i: (hb, [hts[j]]) for i, (hb, hts) in st.items()}, y, s, f) for st, y, s, f in batches])
        a, b = together.finalize(j, heads), alone.finalize(0, one)
        assert a == b
        assert torch.equal(together.diff[j], alone.diff[0])


def test_merge_of_halves_and_state_round_trip_equal_one_pass():
    heads = models(2, seed=9)
    batches = [batch(2, 20 + s, seed=s, first_id=40 * s, heads=heads) for s in range(4)]
    one = run(heads, batches)
    halves = run(heads, batches[:2]).merge(run(heads, batches[2:]))
    restored = LensDrift(heads.indices, L + 1, 2, D)
    restored.load_state_dict({k: v.clone() for k, v in halves.state_dict().items()})
    for j in range(2):
        assert halves.finalize(j, heads) == one.finalize(j, heads) == restored.finalize(j, heads)
    torch.testing.assert_close(halves.diff, one.diff, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="indices"):
        LensDrift([0, 1, L], L + 1, 2, D).load_state_dict(halves.state_dict())


def test_promoted_tokens_against_float64_brute_force():
    heads = models(1, seed=11)
    batches = [batch(1, 33, seed=s, first_id=20 * s, heads=heads) for s in (3, 4)]
    acc = run(heads, batches)
    out = acc.promoted(0, heads, decode=lambda t: f"<{t}>", top_k=5)
    for k, i in enumerate(heads.indices):
        diff = torch.cat([st[i][1][0].double() - st[i][0].double() for st, *_ in batches]).mean(0)
        gamma = torch.ones(D, dtype=torch.float64) if i == L else heads.base.gamma.double()
        s = heads.base.head.double() @ (gamma * diff)
        assert [r["id"] for r in out[k]["promoted"]] == torch.argsort(s, descending=True)[:5].tolist()
        assert [r["id"] for r in out[k]["suppressed"]] == torch.argsort(s)[:5].tolist()
        assert out[k]["promoted"][0]["text"] == f"<{out[k]['promoted'][0]['id']}>"
        got = torch.tensor([r["score"] for r in out[k]["promoted"]], dtype=torch.float64)
        torch.testing.assert_close(got, s.sort(descending=True).values[:5], rtol=1e-10, atol=1e-12)
    zero = promoted_scores(heads.base.head, heads.base.gamma, torch.zeros(D))
    assert torch.equal(zero, torch.zeros(V, dtype=torch.float64))


def per_call_lens(heads: LensHeads, batches) -> list[dict]:
    """The lens as separate vocab_probe calls (the way before vocab_probe_pairs): per index a cross call of the base
    against every tuned model, per model one self call of its output against its lens at every index."""
    n, J = len(heads.indices), len(heads.tuned)
    cross = [[TokenMetrics() for _ in range(n)] for _ in range(J)]
    own = [[TokenMetrics() for _ in range(n)] for _ in range(J + 1)]
    models = [heads.base, *heads.tuned]
    for states, y, sids, first in batches:
        lens = lambda m, i: (states[i][0] if m == 0 else states[i][1][m - 1]) if i == L else models[m].norm(  # noqa
            states[i][0] if m == 0 else states[i][1][m - 1])
        for k, i in enumerate(heads.indices):
            for j in range(J):
                r = vocab_probe(lens(0, i), heads.base.head, lens(1 + j, i), heads.tuned[j].head, y,
                                valid_vocab=heads.valid_vocab[j])
                cross[j][k].update(r, sids, first)
        for m, mm in enumerate(models):
            rs = vocab_probe(lens(m, L), mm.head, [lens(m, i) for i in heads.indices], [mm.head] * n, y)
            for k, r in enumerate(rs):
                own[m][k].update(r, sids, first)
    rows = lambda accs: [{"index": i, **a.finalize()} for i, a in zip(heads.indices, accs)]
    return [{"lens": rows(cross[j]), "self_lens": {"base": rows(own[0]), "tuned": rows(own[1 + j])}} for j in range(J)]


@pytest.mark.parametrize("outputs", [True, False], ids=["reuse-output", "recompute"])
@pytest.mark.parametrize("variant", ["plain", "padded-heads", "nan-row"])
def test_shared_lens_logits_equal_separate_calls_bitwise(outputs, variant):
    """vocab_probe_pairs computes each model's lens logits once per index for its cross and self pairs, and index L's
    self pairs come from the output probe: every number equals the separate calls'. Padded tuned heads (a
    valid_vocab cut) and a NaN state row (flagged outputs) take the computed paths."""
    heads = models(2, seed=11)
    batches = [batch(2, 26, seed=s, first_id=60 * s, heads=heads) for s in (3, 4)]
    if variant == "padded-heads":
        for m in heads.tuned:
            m.head = torch.cat([m.head, torch.randn(5, D)])
        heads.valid_vocab = [V, V]
    if variant == "nan-row":
        batches[0][0][L][1][1][3] = float("nan")
    got = run(heads, batches, outputs) if variant != "padded-heads" else LensDrift(heads.indices, L + 1, 2, D)
    if variant == "padded-heads":
        for states, y, sids, first in batches:
            hb, hts = states[L]
            outs = vocab_probe(hb, heads.base.head, hts, [m.head for m in heads.tuned], y, valid_vocab=V)
            got.update(heads, states, y, sids, first, outs if outputs else None)
    want = per_call_lens(heads, batches)
    for j in range(2):
        assert got.finalize(j) == want[j], j


def test_the_lens_computes_each_models_logits_once_per_index(monkeypatch):
    """The count the docstring gives: (1 + J)·(n' + 1) source GEMMs per tile and chunk (was 2·(1 + J)·(n' + 1))."""
    cpp = __import__("driftscope.kernels.vocab_probe.cpp", fromlist=["_gemm"])
    from driftscope.kernels import use_backend

    heads = models(2, seed=12)
    calls = []
    real = cpp._gemm
    monkeypatch.setattr(cpp, "_gemm", lambda *a: calls.append(1) or real(*a))
    with use_backend("cpp"):
        for outputs in (True, False):
            states, y, sids, first = batch(2, 20, seed=1, heads=heads)
            outs = output_results(heads, states, y) if outputs else None
            calls.clear()
            LensDrift(heads.indices, L + 1, 2, D).update(heads, states, y, sids, first, outs)
            assert len(calls) == 3 * 3, (outputs, len(calls))  # 3 models x (indices 0, 2 and the output L)


def test_groups_of_indices_bound_a_calls_sources_with_the_same_results(monkeypatch):
    """SOURCES_PER_CALL splits the indices into groups (each call's sources bounded: its buffers' memory), each group
    computing the outputs once more: the same numbers as one call, and the GEMM count the split gives."""
    import driftscope.probes.lens as lens_mod
    from driftscope.kernels import use_backend

    cpp = __import__("driftscope.kernels.vocab_probe.cpp", fromlist=["_gemm"])
    heads = models(2, seed=13)
    batches = [batch(2, 23, seed=s, first_id=30 * s, heads=heads) for s in (5, 6)]
    calls = []
    real = cpp._gemm
    monkeypatch.setattr(cpp, "_gemm", lambda *a: calls.append(1) or real(*a))
    with use_backend("cpp"):
        whole = run(heads, batches)
        n_whole, calls[:] = len(calls), []
        monkeypatch.setattr(lens_mod, "SOURCES_PER_CALL", 6)  # 3 models: one index per group
        split = run(heads, batches)
    assert (n_whole, len(calls)) == (2 * (3 + 9), 2 * (3 + 2 * 6))  # per batch: the output probe's 3, and 9
    # lens sources at once or 2 groups of 6
    for j in range(2):
        assert split.finalize(j, heads) == whole.finalize(j, heads)
