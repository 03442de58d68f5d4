"""probes.examples.TopExamples against a brute-force top-k over every sample and token, also after merge (in either
order, and through state "cat" + load as under torchrun) and after a state round trip."""
from __future__ import annotations

import pytest
import torch

from driftscope.probes.examples import TopExamples

V, N_TOP, W = 40, 5, 3


def logits(sid: torch.Tensor, pos: torch.Tensor, model: int) -> torch.Tensor:
    """Deterministic [R, V] logits of a row, a function of (sample id, position, model): what the heads would give."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(V, generator=g), torch.randn(V, generator=g)
    return torch.sin(a[None] * (sid[:, None] + 1) + b[None] * (pos[:, None] + 1) + model)


def make_batches(seed: int, n_batches: int = 5, ties: bool = False):
    """Batches of whole samples (contiguous rows): (kl [N], targets [N], sample ids [N], positions [N])."""
    g = torch.Generator().manual_seed(seed)
    out, next_id = [], 0
    for _ in range(n_batches):
        lens = torch.randint(1, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        sid = torch.cat([torch.full((n,), next_id + i) for i, n in enumerate(lens)])
        pos = torch.cat([torch.arange(n) for n in lens])
        next_id += len(lens) + 3  # gaps in the ids
        kl = torch.rand(sid.shape[0], generator=g) ** 3
        if ties:
            kl = (kl * 4).round() / 4  # many equal values: the (sample id, position) order decides
        kl[torch.rand(kl.shape[0], generator=g) < 0.05] = float("nan")  # flagged rows
        out.append((kl.float(), torch.randint(0, V, sid.shape, generator=g), sid, pos))
    return out


def feed(acc: TopExamples, batches) -> TopExamples:
    for kl, tg, sid, pos in batches:
        def top_n(rows, sid=sid, pos=pos):
            res = []
            for m in (0, 1):
                p = torch.softmax(logits(sid[rows], pos[rows], m), -1)
                t = torch.topk(p, N_TOP, -1)
                res += [t.indices, t.values]
            return tuple(res)
        acc.update(kl, tg, sid, top_n)
    return acc


def brute(batches, k: int) -> dict:
    kl = torch.cat([b[0] for b in batches]).double()
    tg, sid, pos = (torch.cat([b[i] for b in batches]) for i in (1, 2, 3))
    samples = []
    for s in sid.unique().tolist():
        m = sid == s
        if not kl[m].isnan().any():
            samples.append((-kl[m].mean().item(), s, tg[m].tolist(), kl[m].float().tolist()))
    samples.sort(key=lambda r: (r[0], r[1]))
    toks = sorted([(-kl[r].item(), sid[r].item(), pos[r].item(), r) for r in range(kl.shape[0])
                   if not kl[r].isnan()])[:k]
    tokens = []
    for _, s, p, r in toks:
        ctx = [tg[r + o].item() if 0 <= r + o < kl.shape[0] and sid[r + o] == s else -1 for o in range(-W, W + 1)]
        tops = [torch.topk(torch.softmax(logits(sid[r:r + 1], pos[r:r + 1], m), -1), N_TOP, -1) for m in (0, 1)]
        tokens.append({"sample_id": s, "position": p, "kl": kl[r].item(), "context_ids": ctx,
                       "base_top": tops[0].indices[0].tolist(), "tuned_top": tops[1].indices[0].tolist(),
                       "tuned_p": tops[1].values[0].tolist()})
    return {"samples": [(s, -m, t, x) for m, s, t, x in samples[:k]], "tokens": tokens}


def check(acc: TopExamples, ref: dict) -> None:
    f = acc.finalize()
    got = [(r["sample_id"], r["mean_kl"], r["token_ids"], r["kl"]) for r in f["top_samples"]]
    assert [g[0] for g in got] == [r[0] for r in ref["samples"]]
    for g, r in zip(got, ref["samples"]):
        assert g[1] == pytest.approx(r[1], rel=1e-12) and g[2] == r[2] and g[3] == r[3]
    assert len(f["top_tokens"]) == len(ref["tokens"])
    for g, r in zip(f["top_tokens"], ref["tokens"]):
        assert (g["sample_id"], g["position"], g["kl"], g["context_ids"]) == \
            (r["sample_id"], r["position"], r["kl"], r["context_ids"])
        assert [x["id"] for x in g["base_top"]] == r["base_top"] and [x["id"] for x in g["tuned_top"]] == r["tuned_top"]
        assert [x["p"] for x in g["tuned_top"]] == pytest.approx(r["tuned_p"], rel=1e-6)


@pytest.mark.parametrize("k", [1, 4, 50], ids=["k1", "k4", "k50-more-than-rows"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_equals_brute_force(k, ties):
    batches = make_batches(k + 10 * ties, ties=ties)
    check(feed(TopExamples(k, window=W, n=N_TOP), batches), brute(batches, k))


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_merge_and_state_round_trip_equal_brute_force(ties):
    k, batches = 4, make_batches(7, n_batches=8, ties=ties)
    ref = brute(batches, k)
    a, b = feed(TopExamples(k, W, N_TOP), batches[:3]), feed(TopExamples(k, W, N_TOP), batches[3:])
    sa, sb = a.state_dict(), b.state_dict()
    check(TopExamples(k, W, N_TOP).merge(b).merge(a), ref)  # merge order does not matter
    cat = {key: sa[key] if key == "config" else torch.cat([sa[key], sb[key]]) for key in sa}  # World.merge's "cat"
    restored = TopExamples(k, W, N_TOP)
    restored.load_state_dict(cat)
    check(restored, ref)
    again = TopExamples(k, W, N_TOP)
    again.load_state_dict(restored.state_dict())
    check(feed(again, []), ref)
    with pytest.raises(ValueError, match="k, window, n"):
        TopExamples(k + 1, W, N_TOP).load_state_dict(sa)


def test_split_sample_refused():
    acc = TopExamples(2)
    kl, sid = torch.rand(4), torch.tensor([0, 1, 0, 1])
    with pytest.raises(AssertionError, match="contiguous"):
        acc.update(kl, torch.zeros(4, dtype=torch.int64), sid, lambda rows: None)
