"""End-to-end plumbing a runner will use: records -> PackedBatch -> per-position probe -> TokenMetrics, checked
against the paper's own indexing (joint tokenization, prompt_logprobs[prompt_length + 1:], calculate_KL.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from driftscope.engine.data import pack_batches

from driftscope.records import load_samples
from driftscope.probes import ShiftedTokens, TokenMetrics
from probe_helpers import assert_close

V = 256


class ByteTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


def bigram_models(seed=0):
    g = torch.Generator().manual_seed(seed)
    wb = torch.randn(V, V, generator=g, dtype=torch.float64) * 2
    return wb, wb + 0.7 * torch.randn(V, V, generator=g, dtype=torch.float64)  # logits of next token | token


def probe_reference(x, y, wb, wt):
    """The vocab-probe quantities of DESIGN.md §3 from full logits (float64, obviously right)."""
    zb, zt = wb[x], wt[x]  # [N, V]
    lb, lt = zb.log_softmax(-1), zt.log_softmax(-1)
    top_b, top_t = zb.argmax(-1), zt.argmax(-1)
    rank = lambda z, t: 1 + (z > z.gather(1, t[:, None])).sum(1)  # noqa: E731
    return {
        "kl_tb": (lt.exp() * (lt - lb)).sum(-1), "kl_bt": (lb.exp() * (lb - lt)).sum(-1),
        "logp_base": lb.gather(1, y[:, None])[:, 0], "logp_tuned": lt.gather(1, y[:, None])[:, 0],
        "rank_base": rank(zb, y), "rank_tuned": rank(zt, y), "top_base": top_b, "top_tuned": top_t,
        "rank_shift_top": rank(zb, top_t), "entropy_base": -(lb.exp() * lb).sum(-1),
        "entropy_tuned": -(lt.exp() * lt).sum(-1),
    }


def paper_sampled_kl(records, wb, wt):
    """calculate_logits_and_ranks_token_level.py + calculate_KL.py with a joint tokenization."""
    tok = ByteTokenizer()
    per_point, tokens = [], 0
    for r in records:
        if not (r["input"] and r["output"]):
            continue
        ids = torch.tensor(tok.encode(r["input"] + r["output"]))
        prompt_length = len(tok.encode(r["input"]))
        # prompt_logprobs[j] = log p(ids[j] | ids[:j]) for j >= 1 (entry 0 is None in vLLM)
        lp = {name: [None] + w[ids[:-1]].log_softmax(-1).gather(1, ids[1:, None])[:, 0].tolist()
              for name, w in (("base", wb), ("tuned", wt))}
        gen, test = lp["tuned"][prompt_length + 1:], lp["base"][prompt_length + 1:]
        if not gen:
            continue
        gen_p, test_p = np.exp(np.array(gen)) + 1e-10, np.exp(np.array(test)) + 1e-10
        per_point.append(np.mean(np.log(gen_p) - np.log(test_p)))
        tokens += len(gen)
    return abs(np.mean(per_point)), len(per_point), tokens


@pytest.mark.parametrize("budget", [64, 10_000], ids=["many-batches", "one-batch"])
def test_packed_run_reproduces_paper_indexing(tmp_path, budget):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", " ", "\n", "42", "é", "?"]
    records = [{"input": "".join(rng.choice(words, rng.integers(1, 8))) + "\n\n",
                "output": "".join(rng.choice(words, rng.integers(1, 12)))} for _ in range(25)]
    records.insert(3, {"input": "q\n\n", "output": "x"})  # one response token: nothing left after the skip
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    wb, wt = bigram_models()
    samples, problems = load_samples(f, ByteTokenizer())
    assert problems == []
    tm, st, n_scored = TokenMetrics(), ShiftedTokens(V), 0
    for batch in pack_batches(samples, budget):
        x, y = batch.input_ids[batch.score_mask], batch.scored_targets  # the runner's [N] positions/targets
        probe = probe_reference(x, y, wb, wt)
        tm.update(probe, batch.scored_sample_ids, batch.scored_first)
        st.update(y, probe["rank_base"], probe["rank_tuned"])
        n_scored += int(batch.score_mask.sum())
    out = tm.finalize()
    kl, n_points, n_tokens = paper_sampled_kl(records, wb, wt)
    assert out["tokens"] == n_scored == sum(len(r["output"].encode()) for r in records)
    assert (out["sampled_kl"]["samples"], out["sampled_kl"]["tokens"]) == (n_points, n_tokens)
    assert_close(out["sampled_kl"]["value"], kl, rtol=1e-12, what="sampled KL vs the paper's indexing")
    assert st.finalize()["tokens"] == n_scored
