"""HiddenSimilarity against a direct float64 batch computation (cosine, relative L2, linear CKA)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from driftscope.probes.base import load_state, save_state
from driftscope.probes.hidden_similarity import HiddenSimilarity, projection_matrix
from probe_helpers import assert_close

# (N tokens, d, dtype, cka mode); odd sizes, a tiny N, bf16 inputs like a real run
CASES = [(3, 8, torch.float32, "full"), (37, 24, torch.float32, "full"), (257, 16, torch.bfloat16, "full"),
         (101, 40, torch.float32, "projected"), (19, 8, torch.float32, "none")]
IDS = [f"N{n}-d{d}-{str(dt)[6:]}-{m}" for n, d, dt, m in CASES]


def states(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hb = torch.randn(n, d, generator=g) * 3 + torch.randn(d, generator=g)  # nonzero mean: centring matters
    ht = hb @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)) + 0.5 * torch.randn(n, d, generator=g)
    return hb.to(dtype), ht.to(dtype)


def cka_direct(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return (torch.linalg.matrix_norm(y.T @ x) ** 2
            / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y))).item()


@pytest.mark.parametrize("n,d,dtype,mode", CASES, ids=IDS)
def test_matches_direct_float64(n, d, dtype, mode):
    hb, ht = states(n, d, dtype)
    acc = HiddenSimilarity(n_layers=2, hidden_size=d, cka=mode, proj_dim=6, seed=3)
    acc.update(1, hb, ht)
    out = acc.finalize()
    json.dumps(out, allow_nan=False)
    row = out["layers"][1]
    x, y = hb.to(torch.float64), ht.to(torch.float64)
    diff = (y - x).norm(dim=1)
    assert row["tokens"] == n and out["layers"][0]["tokens"] == 0
    assert_close(row["cos_mean"], F.cosine_similarity(x, y, dim=1).mean(), rtol=1e-12, what="cos")
    assert_close(row["rel_l2_mean"], (diff / x.norm(dim=1)).mean(), rtol=1e-12, what="rel_l2_mean")
    assert_close(row["rel_l2_ratio_of_sums"], diff.sum() / x.norm(dim=1).sum(), rtol=1e-12, what="ratio")
    assert_close(row["rel_l2_fro"], (y - x).norm() / x.norm(), rtol=1e-12, what="fro")
    if mode == "none":
        assert row["cka"] is None
        return
    if mode == "projected":
        r = projection_matrix(d, 6, 3)
        x, y = x @ r, y @ r
    assert_close(row["cka"], cka_direct(x, y), rtol=1e-10, what="cka")


def test_cka_invariances():
    hb, _ = states(200, 12, torch.float64, seed=1)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    acc = HiddenSimilarity(1, 12)
    acc.update(0, hb, 2.5 * hb @ q + 7.0)  # CKA is invariant to rotation, isotropic scale, translation
    assert_close(acc.finalize()["layers"][0]["cka"], 1.0, rtol=1e-10, what="cka(X, aXQ+b)")


@pytest.mark.parametrize("mode", ["full", "projected", "none"])
def test_merge_and_state_round_trip(tmp_path, mode):
    hb, ht = states(90, 10, torch.float32, seed=2)
    whole = HiddenSimilarity(3, 10, cka=mode, proj_dim=4)
    for layer in range(3):
        whole.update(layer, hb * (layer + 1), ht)
    a, b = HiddenSimilarity(3, 10, cka=mode, proj_dim=4), HiddenSimilarity(3, 10, cka=mode, proj_dim=4)
    for layer in range(3):
        a.update(layer, hb[:41] * (layer + 1), ht[:41])
        b.update(layer, hb[41:] * (layer + 1), ht[41:])
    save_state(a.merge(b), tmp_path / "h.safetensors")
    back = load_state(HiddenSimilarity(1, 1), tmp_path / "h.safetensors")
    for got in (a.finalize(), back.finalize()):
        for r, e in zip(got["layers"], whole.finalize()["layers"]):
            for k in ("cos_mean", "rel_l2_mean", "rel_l2_ratio_of_sums", "rel_l2_fro", "cka"):
                if e[k] is not None:
                    assert_close(r[k], e[k], rtol=1e-12, what=f"layer {r['layer']} {k}")
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(HiddenSimilarity(3, 10, cka=mode, proj_dim=4, seed=9))


def test_bad_input():
    acc = HiddenSimilarity(2, 8)
    with pytest.raises(ValueError, match="layer 2"):
        acc.update(2, torch.zeros(1, 8), torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        acc.update(0, torch.zeros(1, 8), torch.zeros(1, 7))
    with pytest.raises(ValueError, match="cka"):
        HiddenSimilarity(2, 8, cka="exact")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    hb, ht = states(300, 32, torch.bfloat16, seed=4)
    res = {}
    for dev in ("cpu", "cuda"):
        acc = HiddenSimilarity(1, 32, cka="full")
        acc.update(0, hb.to(dev), ht.to(dev))
        res[dev] = acc.finalize()["layers"][0]
    for k in ("cos_mean", "rel_l2_mean", "rel_l2_fro", "cka"):
        assert_close(res["cuda"][k], res["cpu"][k], rtol=1e-10, what=k)


@pytest.mark.parametrize("mode", ["full", "projected", "none"])
def test_j_tuned_models_equal_j_single_pair_accumulators(mode, tmp_path):
    """One accumulator for 3 tuned models (the base sums once) gives each model exactly its single-pair numbers,
    through a merge and a state round trip; the base CKA sums exist once."""
    hb, _ = states(70, 10, torch.float32, seed=5)
    hts = [states(70, 10, torch.float32, seed=6 + j)[1] for j in range(3)]
    many = HiddenSimilarity(2, 10, cka=mode, proj_dim=4, n_tuned=3)
    other = HiddenSimilarity(2, 10, cka=mode, proj_dim=4, n_tuned=3)
    singles = [HiddenSimilarity(2, 10, cka=mode, proj_dim=4) for _ in hts]
    for layer in range(2):
        many.update(layer, hb[:30] * (layer + 1), [h[:30] for h in hts])
        other.update(layer, hb[30:] * (layer + 1), [h[30:] for h in hts])
        for acc, ht in zip(singles, hts):
            acc.update(layer, hb[:30] * (layer + 1), ht[:30])
            acc.update(layer, hb[30:] * (layer + 1), ht[30:])
    save_state(many.merge(other), tmp_path / "h.safetensors")
    back = load_state(HiddenSimilarity(1, 1), tmp_path / "h.safetensors")
    for j, single in enumerate(singles):
        want = single.finalize()
        for got in (many.finalize(j), back.finalize(j)):
            for r, e in zip(got["layers"], want["layers"]):
                for k, v in e.items():
                    assert v is None or r[k] == pytest.approx(v, rel=1e-12, abs=0), (j, r["layer"], k)
    assert sum(1 for k in many.state_dict() if k.startswith("m.xtx.")) == (2 if mode != "none" else 0)
    with pytest.raises(ValueError, match="expected the states of 3 tuned model"):
        many.update(0, hb, hts[:2])
