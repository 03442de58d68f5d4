"""TokenMetrics against a per-sample float64 reference (the paper's calculate_KL.py loop for sampled KL)."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from driftscope.kernels.vocab_probe.common import FLAGGED
from driftscope.probes.base import load_state, save_state
from driftscope.probes.token_metrics import (
    KL_EDGES, RANK_SHIFT_EDGES, TokenMetrics, histogram_counts, mean_of_task_means,
)
from probe_helpers import assert_close, fake_probe, subset

# (samples, max tokens per sample): tiny, odd, larger; a 1-token sample exercises the paper's skip
CASES = [(1, 1), (3, 7), (37, 41), (200, 16)]


def make_batch(n_samples: int, max_len: int, seed: int):
    rng = random.Random(seed)
    lens = [rng.randint(1, max_len) for _ in range(n_samples)]
    ids = torch.repeat_interleave(torch.arange(n_samples) * 3 + 5, torch.tensor(lens))  # sparse global ids
    first = torch.zeros(ids.shape[0], dtype=torch.bool)
    first[torch.tensor([0] + list(np.cumsum(lens)[:-1]))] = True
    return fake_probe(ids.shape[0], seed), ids, first


def reference(probe, ids, first):
    """Plain float64 per-sample loops, written to be obviously right."""
    p = {k: v.to(torch.float64).tolist() for k, v in probe.items()}
    per = {}
    for t, s in enumerate(ids.tolist()):
        per.setdefault(s, []).append(t)
    def metric(name, t):
        if name == "rank_shift":
            return p["rank_base"][t] - p["rank_tuned"][t]
        if name == "top1_agree":
            return float(p["top_base"][t] == p["top_tuned"][t])
        return p[name][t]
    names = ["kl_tb", "kl_bt", "entropy_base", "entropy_tuned", "logp_base", "logp_tuned", "rank_shift",
             "rank_shift_top", "top1_agree", "rank_base", "rank_tuned"]
    tok = {n: sum(metric(n, t) for t in range(len(ids))) / len(ids) for n in names}
    smp = {n: sum(sum(metric(n, t) for t in ts) / len(ts) for ts in per.values()) / len(per) for n in names}
    # the paper: probs = exp(-loss) + 1e-10 per token (first response token already dropped), np.mean, mean, abs
    kl_per_point = []
    for ts in per.values():
        keep = [t for t in ts if not first[t]]
        if not keep:
            continue  # calculate_KL.py: `if min_tokens == 0: continue`
        gen = np.exp(np.array([p["logp_tuned"][t] for t in keep])) + 1e-10
        test = np.exp(np.array([p["logp_base"][t] for t in keep])) + 1e-10
        kl_per_point.append(np.mean(np.log(gen) - np.log(test)))
    return tok, smp, abs(np.mean(kl_per_point)) if kl_per_point else math.nan, len(kl_per_point)


@pytest.mark.parametrize("n_samples,max_len", CASES, ids=[f"S{s}-L{length}" for s, length in CASES])
def test_matches_reference(n_samples, max_len):
    probe, ids, first = make_batch(n_samples, max_len, seed=n_samples)
    acc = TokenMetrics()
    acc.update(probe, ids, first)
    out = acc.finalize()
    tok, smp, kl, n_kl = reference(probe, ids, first)
    assert out["tokens"] == len(ids) and out["samples"] == n_samples
    for k in tok:
        assert_close(out["token_mean"][k], tok[k], rtol=1e-12, atol=1e-12, what=f"token_mean.{k}")
        assert_close(out["sample_mean"][k], smp[k], rtol=1e-12, atol=1e-12, what=f"sample_mean.{k}")
    assert out["sampled_kl"]["samples"] == n_kl
    assert out["sampled_kl"]["tokens"] == int((~first).sum())
    if n_kl:
        assert_close(out["sampled_kl"]["value"], kl, rtol=1e-12, atol=1e-15, what="sampled_kl")
    else:
        assert out["sampled_kl"]["value"] is None
    json.dumps(out, allow_nan=False)
    for k, h in out["histograms"].items():
        assert sum(h["counts"]) == len(ids), k


@pytest.mark.parametrize("n_samples,max_len", CASES[1:], ids=[f"S{s}-L{length}" for s, length in CASES[1:]])
def test_merge_and_batch_order_are_bitwise_exact(n_samples, max_len):
    probe, ids, first = make_batch(n_samples, max_len, seed=7)
    whole = TokenMetrics()
    whole.update(probe, ids, first)
    # split into batches of whole samples, feed in a shuffled order, across two accumulators, then merge
    uniq = ids.unique().tolist()
    random.Random(1).shuffle(uniq)
    groups = [uniq[i::3] for i in range(3)]
    a, b = TokenMetrics(), TokenMetrics()
    for j, g in enumerate(groups):
        sel = torch.isin(ids, torch.tensor(g))
        if sel.any():
            (a if j % 2 else b).update(subset(probe, sel), ids[sel], first[sel])
    merged = b.merge(a).finalize()
    assert merged == whole.finalize()  # bitwise: totals are summed in sample-id order at finalize


def test_state_dict_round_trip(tmp_path):
    probe, ids, first = make_batch(23, 9, seed=3)
    half = ids < ids.unique()[11]
    acc = TokenMetrics()
    acc.update(subset(probe, half), ids[half], first[half])
    save_state(acc, tmp_path / "tm.safetensors")
    resumed = load_state(TokenMetrics(), tmp_path / "tm.safetensors")
    for x in (acc, resumed):
        x.update(subset(probe, ~half), ids[~half], first[~half])
    full = TokenMetrics()
    full.update(probe, ids, first)
    assert resumed.finalize() == acc.finalize() == full.finalize()


def test_rank_means_leave_flagged_rows_out():
    """The rank_base / rank_tuned means (a `mean` label on VocabProbeResult, nothing else): brute-force token and
    sample means over the unflagged tokens. A flagged row (ranks FLAGGED = -1, floats NaN) never averages in as a
    number: its sample's mean and the task's means are NaN (null), like every other mean's."""
    probe, ids, first = make_batch(37, 9, seed=4)
    bad = torch.zeros(len(ids), dtype=torch.bool)
    bad[::5] = True
    spoiled = {k: v.masked_fill(bad, math.nan if v.is_floating_point() else FLAGGED) for k, v in probe.items()}
    clean, every = TokenMetrics(), TokenMetrics()
    clean.update(subset(probe, ~bad), ids[~bad], first[~bad])
    every.update(spoiled, ids, first)
    out, table = clean.finalize(), every.per_sample()
    assert out["tokens"] == int((~bad).sum())
    s = ids[~bad]
    for k in ("rank_base", "rank_tuned"):
        v = probe[k][~bad].double()
        assert_close(out["token_mean"][k], v.mean().item(), rtol=1e-12, what=f"token_mean.{k}")
        want = torch.stack([v[s == i].mean() for i in s.unique()]).mean().item()
        assert_close(out["sample_mean"][k], want, rtol=1e-12, what=f"sample_mean.{k}")
        assert every.finalize()["token_mean"][k] is None and every.finalize()["sample_mean"][k] is None
        for i, got in zip(table["sample_id"], table[k]):  # a sample without a flagged row keeps its own mean
            mine = ids == i
            assert math.isnan(got) if bad[mine].any() else got == probe[k][mine].double().mean().item(), (k, i)


def test_sample_seen_twice_is_refused():
    probe, ids, first = make_batch(3, 5, seed=0)
    acc = TokenMetrics()
    acc.update(probe, ids, first)
    with pytest.raises(AssertionError, match="already accumulated"):
        acc.update(probe, ids, first)
    other = TokenMetrics()
    other.update(probe, ids, first)
    with pytest.raises(AssertionError, match="already accumulated"):
        acc.merge(other)


def test_identical_models_give_zero_drift():
    probe, ids, first = make_batch(5, 6, seed=2)
    for a, b in (("logp_tuned", "logp_base"), ("rank_tuned", "rank_base"), ("top_tuned", "top_base")):
        probe[a] = probe[b].clone()
    probe["kl_tb"].zero_()
    out = TokenMetrics()
    out.update(probe, ids, first)
    r = out.finalize()
    assert r["sampled_kl"]["value"] == 0.0 and r["token_mean"]["rank_shift"] == 0.0
    assert r["token_mean"]["top1_agree"] == 1.0 and r["histograms"]["kl_tb"]["counts"][0] == len(ids)


def test_histogram_bins():
    v = torch.tensor([-100001, -100000, -6, -5, -1, 0, 1, 5, 6, 10, 11, 100000, 100001], dtype=torch.float64)
    c = histogram_counts(v, RANK_SHIFT_EDGES)
    e = RANK_SHIFT_EDGES
    def bin_of(x):  # counts[i]: e[i-1] <= x < e[i]
        return sum(1 for edge in e if edge <= x)
    expected = torch.zeros(len(e) + 1, dtype=torch.int64)
    for x in v.tolist():
        expected[bin_of(x)] += 1
    assert torch.equal(c, expected), f"{c.tolist()} vs {expected.tolist()}"
    # one bin per integer in [-5, 5]
    for x in range(-5, 6):
        i = bin_of(x)
        assert e[i - 1] == x and e[i] == x + 1, (x, e[i - 1], e[i])
    # KL: 0 and negative rounding noise in the underflow bin, 10 bins per decade
    k = histogram_counts(torch.tensor([-1e-12, 0.0, 1e-8, 1.0, 99.0, 1e3], dtype=torch.float64), KL_EDGES)
    assert k[0] == 2 and k[1] == 1 and k[-1] == 1 and k.sum() == 6
    assert_close(KL_EDGES[10], 1e-7, rtol=1e-15, what="decade edge")


def test_bad_shapes_name_the_field():
    probe, ids, first = make_batch(2, 3, seed=0)
    probe["kl_bt"] = probe["kl_bt"][:-1]
    with pytest.raises(ValueError, match="kl_bt"):
        TokenMetrics().update(probe, ids, first)
    del probe["kl_bt"]
    with pytest.raises(ValueError, match="lacks field 'kl_bt'"):
        TokenMetrics().update(probe, ids, first)
    probe["kl_bt"], probe["logp_base"] = probe["kl_tb"], None
    with pytest.raises(ValueError, match="'logp_base' is None"):
        TokenMetrics().update(probe, ids, first)


def test_empty_finalize_is_valid_json():
    out = TokenMetrics().finalize()
    assert out["tokens"] == 0 and out["samples"] == 0 and out["sampled_kl"]["value"] is None
    json.dumps(out, allow_nan=False)


def test_accepts_attribute_objects():
    from types import SimpleNamespace
    probe, ids, first = make_batch(4, 4, seed=5)
    a, b = TokenMetrics(), TokenMetrics()
    a.update(probe, ids, first)
    b.update(SimpleNamespace(**probe), ids, first)
    assert a.finalize() == b.finalize()


def test_per_sample_table_and_task_means():
    probe, ids, first = make_batch(9, 5, seed=8)
    acc = TokenMetrics()
    acc.update(probe, ids, first)
    table, out = acc.per_sample(), acc.finalize()
    assert table["sample_id"] == sorted(ids.unique().tolist()) and sum(table["tokens"]) == out["tokens"]
    assert_close(sum(table["kl_tb"]) / 9, out["sample_mean"]["kl_tb"], rtol=1e-12, what="per-sample kl_tb")
    kept = [v for v in table["paper_log_ratio"] if v is not None]
    assert len(kept) == out["sampled_kl"]["samples"]
    assert_close(abs(sum(kept) / len(kept)), out["sampled_kl"]["value"], rtol=1e-12, what="sampled KL from table")
    tasks = {"a": out, "b": {"token_mean": {"rank_shift": 1.0}}}
    assert mean_of_task_means(tasks) == (out["token_mean"]["rank_shift"] + 1.0) / 2
    assert math.isnan(mean_of_task_means({"a": {"token_mean": {"rank_shift": None}}}))
