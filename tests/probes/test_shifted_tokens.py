"""ShiftedTokens against a Counter reference; exact merge and state round trip."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from driftscope.probes.base import load_state, save_state
from driftscope.probes.shifted_tokens import ShiftedTokens

SIZES = [1, 37, 500]


def make(n, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g)
    rb = torch.randint(1, 6, (n,), generator=g)
    rt = torch.where(torch.rand(n, generator=g) < 0.5, rb, torch.randint(1, 6, (n,), generator=g))
    return ids, rb, rt


@pytest.mark.parametrize("n", SIZES, ids=[f"N{n}" for n in SIZES])
def test_matches_counter_reference(n):
    ids, rb, rt = make(n)
    acc = ShiftedTokens(23)
    acc.update(ids, rb, rt)
    out = acc.finalize(decode=lambda i: f"<{i}>", top_k=None)
    cnt, shifted, s = Counter(), Counter(), Counter()
    for i, a, b in zip(ids.tolist(), rb.tolist(), rt.tolist()):
        cnt[i] += 1
        shifted[i] += a != b
        s[i] += a - b
    rows = {r["id"]: r for r in out["top"]}
    assert set(rows) == {i for i in cnt if shifted[i]}
    for i, r in rows.items():
        assert (r["count"], r["count_shifted"], r["text"]) == (cnt[i], shifted[i], f"<{i}>")
        assert r["mean_shift"] == pytest.approx(s[i] / cnt[i], abs=1e-15)
    keys = [(-r["count_shifted"], r["id"]) for r in out["top"]]
    assert keys == sorted(keys), "sorted by count_shifted desc, then id asc"
    assert out["tokens"] == n and out["shifted"] == sum(shifted.values())
    json.dumps(out, allow_nan=False)


def test_merge_and_state_round_trip(tmp_path):
    ids, rb, rt = make(300, seed=4)
    whole = ShiftedTokens(23)
    whole.update(ids, rb, rt)
    a, b = ShiftedTokens(23), ShiftedTokens(23)
    a.update(ids[:100], rb[:100], rt[:100])
    b.update(ids[100:], rb[100:], rt[100:])
    save_state(b.merge(a), tmp_path / "s.safetensors")
    back = load_state(ShiftedTokens(1), tmp_path / "s.safetensors")
    for sort_by in ("count_shifted", "count", "sum_abs_shift"):
        assert back.finalize(top_k=5, sort_by=sort_by) == whole.finalize(top_k=5, sort_by=sort_by)


def test_bad_input():
    acc = ShiftedTokens(10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        acc.update(torch.tensor([10]), torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="rank_tuned"):
        acc.update(torch.tensor([1, 2]), torch.tensor([1, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="sort_by"):
        acc.finalize(sort_by="nope")
