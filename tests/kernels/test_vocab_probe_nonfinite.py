"""vocab_probe flags a token row whose hidden states hold NaN/Inf (every float NaN, every int FLAGGED = -1) on every
backend instead of returning rank 1 and other plausible numbers; the other rows are bit for bit those of the same call
on the unspoiled inputs (same shapes: a BLAS need not repeat a row's bits at another row count, and MKL on an AMD CPU
does not); a non-finite LM head is refused by name; the drift run counts flagged rows in `problems` and
keeps them out of its means, histograms and shifted tokens."""
from __future__ import annotations

import json

import pytest
import torch

from driftscope.kernels import use_backend
from driftscope.probes import ShiftedTokens, TokenMetrics
from test_vocab_probe import FLOAT_FIELDS, INT_FIELDS, vp

NAN, INF = float("nan"), float("inf")
# (tensor, row, column or None for the whole row, value): base row 1 one NaN, base row 9 all -inf, tuned 0 row 4 one
# +inf, tuned 1 row 6 one NaN and row 0 all +inf
BAD = [("base", 1, 3, NAN), ("base", 9, None, -INF), (0, 4, 0, INF), (1, 6, 5, NAN), (1, 0, None, INF)]
BACKENDS = ["torch", "cpp", "triton-panel", "triton-fused"]


def _inputs(j: int, n: int = 12, v: int = 300, d: int = 24, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    hb, wb = 2 * torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) / d**0.5
    hts = [hb + 0.5 * torch.randn(n, d, generator=g) for _ in range(j)]
    wts = [wb + 0.2 * torch.randn(v, d, generator=g) / d**0.5 for _ in range(j)]
    y = torch.randint(0, v, (n,), generator=g)
    return hb.to(dtype), wb.to(dtype), [h.to(dtype) for h in hts], [w.to(dtype) for w in wts], y


def _spoil(hb, hts):
    """Copies with BAD written in (the entries for tuned models beyond len(hts) skipped); the bad rows per result."""
    hb, hts = hb.clone(), [h.clone() for h in hts]
    bad = [set() for _ in hts]
    for who, row, col, val in BAD:
        if who != "base" and who >= len(hts):
            continue
        t = hb if who == "base" else hts[who]
        t[row, slice(None) if col is None else col] = val
        for j in (range(len(hts)) if who == "base" else [who]):
            bad[j].add(row)
    return hb, hts, bad


def _probe(backend: str, request, *args, **kw):
    """vocab_probe on `backend` ("triton-panel": the triton backend's panel path), results on the CPU; triton runs
    where its tests run (CUDA, else the CPU interpreter)."""
    name, _, path = backend.partition("-")
    if path:
        dev = request.getfixturevalue("triton_device")
        request.getfixturevalue("monkeypatch").setenv("DRIFTSCOPE_VOCAB_PATH", path)
        args = [[t.to(dev) for t in a] if isinstance(a, list) else None if a is None else a.to(dev) for a in args]
    with use_backend(name):
        out = vp.vocab_probe(*args, **kw)
    return [vp.VocabProbeResult(**{k: None if t is None else t.cpu() for k, t in r.to_dict().items()}) for r in out]


@pytest.mark.parametrize("targets", [True, False], ids=["targets", "no-targets"])
@pytest.mark.parametrize("j", [1, 2], ids=lambda j: f"J{j}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_are_flagged_and_the_others_unchanged(backend, j, targets, request):
    hb, wb, hts, wts, y = _inputs(j)
    y = y if targets else None
    bhb, bhts, bad = _spoil(hb, hts)
    got = _probe(backend, request, bhb, wb, bhts, wts, y)
    clean = _probe(backend, request, hb, wb, hts, wts, y)  # the unspoiled inputs, same shapes
    for jj, (r, c) in enumerate(zip(got, clean)):
        rows = torch.tensor(sorted(bad[jj]))
        keep = torch.tensor([i not in bad[jj] for i in range(hb.shape[0])])  # also the rows bad for another model
        for f in FLOAT_FIELDS + INT_FIELDS:
            t = getattr(r, f)
            if t is None:
                assert not targets and f in ("logp_base", "logp_tuned", "rank_base", "rank_tuned"), f
                continue
            if f in FLOAT_FIELDS:
                assert t[rows].isnan().all(), f"tuned {jj}: {f} of bad rows {rows.tolist()}: {t[rows].tolist()}"
            else:
                assert (t[rows] == vp.FLAGGED).all(), f"tuned {jj}: {f} of bad rows {rows.tolist()}: {t[rows].tolist()}"
            assert torch.equal(t[keep], getattr(c, f)[keep]), f"tuned {jj}: {f} of the good rows differs from clean"


@pytest.mark.parametrize("where", ["w_base", "w_tuned", "w_tuned[1]"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_a_nonfinite_head_is_refused_by_name(where, value):
    hb, wb, hts, wts, y = _inputs(2)
    w = wb if where == "w_base" else wts[1] if where == "w_tuned[1]" else wts[0]
    w[217, 5] = value
    args = (hb, wb, hts, wts, y) if where != "w_tuned" else (hb, wb, hts[0], wts[0], y)
    with use_backend("torch"), pytest.raises(ValueError) as e:
        vp.vocab_probe(*args)
    msg = str(e.value)
    assert msg.startswith(f"{where} holds NaN/Inf in 1 of its 300 vocabulary rows (first: row 217)"), msg
    assert "\n" not in msg


def test_head_check_sees_padded_rows_and_in_place_writes():
    hb, wb, hts, wts, y = _inputs(1)
    wb[299, 0] = NAN  # beyond valid_vocab: never read, so accepted
    with use_backend("torch"):
        r = vp.vocab_probe(hb, wb, hts[0], wts[0], y, valid_vocab=299)
        assert r.lse_base.isfinite().all()
        wb[17, 1] = INF  # written after a passing check: the version changed, so it is checked again
        with pytest.raises(ValueError, match=r"^w_base holds NaN/Inf in 1 of its 299 vocabulary rows \(first: row 17"):
            vp.vocab_probe(hb, wb, hts[0], wts[0], y, valid_vocab=299)


def test_flagged_rows_stay_out_of_token_metrics_and_shifted_tokens():
    """Histograms and shifted tokens of a batch with bad rows equal those of the batch without them (a flagged rank
    never lands in a bin); the means are NaN (null), never an average over garbage."""
    hb, wb, hts, wts, y = _inputs(1, n=40)
    bhb, bhts, bad = _spoil(hb, hts)
    keep = torch.tensor([i not in bad[0] for i in range(hb.shape[0])])
    with use_backend("torch"):
        got = vp.vocab_probe(bhb, wb, bhts[0], wts[0], y)
        clean = vp.vocab_probe(hb[keep], wb, hts[0][keep], wts[0], y[keep])
    ids = torch.arange(hb.shape[0])
    out = []
    for r, k in ((got, torch.ones_like(keep)), (clean, keep)):
        tm, st = TokenMetrics(), ShiftedTokens(300)
        tm.update(r, ids[k], torch.zeros(int(k.sum()), dtype=torch.bool))
        st.update(y[k], r.rank_base, r.rank_tuned)
        out.append((tm.finalize(), st.state_dict()))
    (tm_bad, st_bad), (tm_clean, st_clean) = out
    assert tm_bad["histograms"] == tm_clean["histograms"]
    assert sum(tm_bad["histograms"]["rank_shift_top"]["counts"]) == int(keep.sum()) < hb.shape[0]
    assert all(torch.equal(st_bad[k], st_clean[k]) for k in st_bad)
    assert tm_bad["tokens"] == hb.shape[0]
    for m in ("kl_tb", "rank_shift", "rank_shift_top", "top1_agree"):
        assert tm_bad["token_mean"][m] is None and tm_clean["token_mean"][m] is not None, m
    json.dumps(tm_bad, allow_nan=False)


def test_drift_counts_flagged_rows_in_problems_and_keeps_them_out_of_every_statistic(tmp_path, monkeypatch):
    """A drift run whose final base states hold NaN at every 7th scored token: those tokens are counted in
    `problems`, the token means are null, and the histograms and shifted tokens count only the other tokens."""
    from driftscope import drift
    from driftscope.drift_run import run as run_module
    from driftscope.demo.run import build_pair, write_datasets

    base, tuned = build_pair(tmp_path / "models")
    data = write_datasets(tmp_path / "data")[0]
    real, spoiled = run_module.vocab_probe, []

    def spoil(hb, *args, **kw):
        hb = hb.clone()
        hb[::7, 0] = NAN
        spoiled.append(len(hb[::7]))
        return real(hb, *args, **kw)

    monkeypatch.setattr(run_module, "vocab_probe", spoil)
    task = drift(base, tuned, data, progress=False, checkpoint_every=0, max_batch_tokens=256).summary
    task = task["models"]["tuned"]["tasks"]["math"]
    bad, tokens = sum(spoiled), task["tokens"]
    assert 0 < bad < tokens
    assert task["problems"][0].startswith(f"{bad} of {tokens} scored tokens gave non-finite logits"), task["problems"]
    assert task["kl_tb"]["token_mean"] is None and task["rank_shift"]["token_mean"] is None
    for name, hist in task["histograms"].items():
        assert sum(hist["counts"]) == tokens - bad, name
    assert task["shifted_tokens"]["tokens"] == tokens - bad
