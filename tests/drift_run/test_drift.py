"""drift() against an independent float64 transformers reference, and its invariances (DESIGN.md §3)."""
from __future__ import annotations

import json

import pytest
import torch
from analysis_helpers import reference_tokens, write_records

from driftscope import drift, load_tokenizer
from driftscope.records import load_samples

OPTS = {"progress": False, "max_batch_tokens": 96}


def _close(a, b, tol, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = (a - b).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {a.numel()} off, max |Δ| {err.max():.3e}; "
                           f"first {bad.nonzero()[:3].flatten().tolist()}")


@pytest.fixture(scope="module")
def reference(models, records):
    samples, _ = load_samples(records, load_tokenizer(models["base"]))
    return reference_tokens(models["base"], models["tuned"], samples)


@pytest.fixture(scope="module")
def run(models, records):
    return drift(models["base"], models["tuned"], records, **OPTS).summary["models"]["tuned"]["tasks"]["mixed"]


def test_token_metrics_match_float64_transformers(run, reference):
    r = reference
    n = r["kl_tb"].numel()
    assert run["tokens"] == n
    assert run["samples"] == len(set(r["sample_id"].tolist()))
    _close(run["kl_tb"]["token_mean"], r["kl_tb"].mean(), 1e-6, "token-mean kl_tb")
    _close(run["kl_bt"]["token_mean"], r["kl_bt"].mean(), 1e-6, "token-mean kl_bt")
    ids = r["sample_id"]
    per = lambda v: torch.stack([v[ids == s].double().mean() for s in ids.unique()])  # noqa: E731
    _close(run["kl_tb"]["sample_mean"], per(r["kl_tb"]).mean(), 1e-6, "sample-mean kl_tb")
    shift = (r["rank_base"] - r["rank_tuned"]).double()
    assert run["rank_shift"]["token_mean"] == pytest.approx(shift.mean().item(), abs=1e-12)
    assert run["rank_shift"]["sample_mean"] == pytest.approx(per(shift).mean().item(), abs=1e-12)
    assert run["top1_agreement"] == pytest.approx((r["top_base"] == r["top_tuned"]).double().mean().item(), abs=1e-12)
    assert run["rank_shift_top"]["token_mean"] == pytest.approx(r["rank_shift_top"].double().mean().item(), abs=1e-12)
    for k in ("rank_base", "rank_tuned"):  # means added by a `mean` label on VocabProbeResult alone
        assert run[k]["token_mean"] == pytest.approx(r[k].double().mean().item(), abs=1e-12), k
        assert run[k]["sample_mean"] == pytest.approx(per(r[k]).mean().item(), abs=1e-12), k
    # the paper's sampled KL: per sample mean of log(p+1e-10) - log(q+1e-10) without the first token, mean, abs
    lr = torch.log(r["logp_tuned"].exp() + 1e-10) - torch.log(r["logp_base"].exp() + 1e-10)
    keep = ~r["first"]
    vals = [lr[(ids == s) & keep].mean() for s in ids.unique() if ((ids == s) & keep).any()]
    _close(run["sampled_kl"], torch.stack(vals).mean().abs(), 1e-6, "sampled KL")


def test_per_token_values_match_float64_transformers(models, records, reference):
    """Per token, through the same runner + vocab_probe path drift() uses (KL |Δ| <= 1e-5, ranks exact)."""
    from driftscope import load_model, vocab_probe
    from driftscope.engine.data import pack_batches
    from driftscope.engine.runner import LockstepRunner

    tok = load_tokenizer(models["base"])
    base, tuned = load_model(models["base"]), load_model(models["tuned"])
    samples, _ = load_samples(records, tok)
    cols: dict[str, list] = {}
    for b in pack_batches(samples, 80):
        hb, (ht,) = LockstepRunner(base, [tuned]).forward(b.input_ids, b.cu_seqlens)
        m = b.score_mask
        res = vocab_probe(hb[m], base.lm_head_weight, ht[m], tuned.lm_head_weight, b.scored_targets)
        for k in ("kl_tb", "kl_bt", "logp_base", "logp_tuned", "rank_base", "rank_tuned", "top_base", "top_tuned",
                  "rank_shift_top"):
            cols.setdefault(k, []).append(getattr(res, k))
    got = {k: torch.cat(v) for k, v in cols.items()}
    for k in ("kl_tb", "kl_bt"):
        _close(got[k], reference[k], 1e-5, k)
    for k in ("logp_base", "logp_tuned"):
        _close(got[k], reference[k], 1e-4, k)
    for k in ("rank_base", "rank_tuned", "top_base", "top_tuned", "rank_shift_top"):
        assert torch.equal(got[k].long(), reference[k].long()), f"{k}: {(got[k].long() != reference[k]).sum()} differ"


def test_identical_models_have_no_drift(models, records):
    s = drift(models["base"], models["base"], records, **OPTS).summary["models"]["base"]["tasks"]["mixed"]
    assert abs(s["kl_tb"]["token_mean"]) < 1e-6 and abs(s["kl_bt"]["token_mean"]) < 1e-6
    assert s["rank_shift"]["token_mean"] == 0 and s["top1_agreement"] == 1.0
    assert s["rank_shift_top"]["token_mean"] == 1.0
    for row in s["layers"]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-9) and row["rel_l2"] == 0.0, row
        assert row["pca_shift"] == 0.0, row


def test_drift_starts_at_the_changed_layer(models, records):
    s = drift(models["base"], models["late"], records, **OPTS).summary["models"]["late"]["tasks"]["mixed"]
    for row in s["layers"][:3]:  # states 0..2: embeddings and outputs of layers 0, 1 (unchanged)
        assert row["rel_l2"] == 0.0 and row["pca_shift"] == 0.0, row
    assert s["layers"][3]["rel_l2"] > 1e-3


def _numbers(summary: dict) -> dict:
    t = summary["models"]
    return json.loads(json.dumps({m: {k: v for k, v in x["tasks"]["mixed"].items() if k != "problems"}
                                  for m, x in t.items()}))


def _assert_same(a, b, rel=1e-9, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        # Δp (llama_cpp's *_dp, dp_percentiles) is a difference of two probabilities: float32 rounding of each,
        # ~1e-7 · p, is absolute there, however small the difference
        tol = 1e-7 if "dp_percentiles" in path or path.endswith(("_dp", "_dp_err")) else 1e-9
        assert a == pytest.approx(b, rel=rel, abs=tol), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_independent_of_batch_budget_and_record_order(models, records, tmp_path):
    ref = drift(models["base"], models["tuned"], records, **OPTS).summary
    small = drift(models["base"], models["tuned"], records, **{**OPTS, "max_batch_tokens": 40}).summary
    _assert_same(_numbers(ref), _numbers(small), rel=1e-5)
    shuffled = write_records(tmp_path / "mixed.jsonl", shuffle_seed=3)
    other = drift(models["base"], models["tuned"], shuffled, **OPTS).summary
    a, b = _numbers(ref), _numbers(other)
    for m in (a, b):  # sample ids are record positions, so only order-free aggregates are compared
        for t in m.values():
            t.pop("shifted_tokens")
    _assert_same(a, b, rel=1e-5)
