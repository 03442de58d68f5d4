"""The peer benchmark's own arithmetic (bench/peers/): the transformers baseline scores exactly the tokens driftscope
scores, its per-token statistics equal float64 maths, llama.cpp's output is read right, ratios and the per-doc check
say what they claim. Cheap: a BPE tokenizer trained on the spot, no model weights."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.peers import hf_drift, peers, run
from bench.peers import workloads as w


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    from driftscope.testing import write_tokenizer

    rows = w.read_jsonl(w.MATH_RESPONSES)[:40] if w.MATH_RESPONSES.is_file() else []
    if not rows:
        pytest.skip(f"real data {w.MATH_RESPONSES} is absent")
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder, [r["input"] + r["output"] for r in rows], vocab_size=400)
    return folder, rows


@pytest.mark.parametrize("max_tokens", [256, 37, 2])
def test_batches_score_the_tokens_driftscope_scores(tok_folder, max_tokens, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from driftscope import load_tokenizer
    from driftscope.engine.data import tokenize_records
    from driftscope.records import read_records

    folder, rows = tok_folder
    records_file = folder / "records.jsonl"
    records_file.write_text("".join(json.dumps(r) + "\n" for r in rows)
                            + json.dumps({"input": "no response here", "output": ""}) + "\n")  # nothing to score
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    monkeypatch.setattr(hf_drift, "DRIFT_MAX_TOKENS", max_tokens)
    monkeypatch.setattr(hf_drift, "BATCH_TOKENS", 600)
    bs = hf_drift.batches(hf_tok, w.read_jsonl(records_file))
    records, _ = read_records(records_file)
    samples = tokenize_records(records, load_tokenizer(folder), max_seq_len=max_tokens)
    want = sorted(s.input_ids[s.first_scored + 1:].tolist() for s in samples)
    got = []
    for ids, att, scored, y in bs:
        assert ids.numel() <= 600 or ids.shape[0] == 1  # the token budget, padding included
        assert not scored[~att.bool()].any()  # no padded position is scored
        lens = att.sum(1).tolist()
        assert lens == sorted(lens)
        for i in range(ids.shape[0]):
            got.append(ids[i, 1:][scored[i, :-1]].tolist())
        assert torch.equal(torch.cat([ids[i, 1:][scored[i, :-1]] for i in range(ids.shape[0])]), y)
    assert sorted(g for g in got if g) == want
    assert sum(map(len, got)) == sum(s.n_scored for s in samples)


@pytest.mark.parametrize("n,v,scale", [(7, 50, 1.0), (3, 1000, 30.0), (1, 5, 0.0)])
def test_stats_equal_float64_maths(n, v, scale):
    g = torch.Generator().manual_seed(n + v)
    zb = (scale * torch.randn(n, v, generator=g)).round(decimals=1)  # rounded: ties in the ranks
    zt = zb + 0.3 * torch.randn(n, v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    got = hf_drift.stats(zb, zt, y)
    want = torch.zeros(8, dtype=torch.float64)
    for i in range(n):
        b, t = zb[i].double().tolist(), zt[i].double().tolist()
        lse_b = math.log(sum(math.exp(x - max(b)) for x in b)) + max(b)
        lse_t = math.log(sum(math.exp(x - max(t)) for x in t)) + max(t)
        lb, lt = [x - lse_b for x in b], [x - lse_t for x in t]
        yi = int(y[i])
        want += torch.tensor([sum(math.exp(q) * (q - p) for p, q in zip(lb, lt)),
                              sum(math.exp(p) * (p - q) for p, q in zip(lb, lt)), lb[yi], lt[yi],
                              1 + sum(x > b[yi] for x in b), 1 + sum(x > t[yi] for x in t),
                              -sum(math.exp(p) * p for p in lb), -sum(math.exp(q) * q for q in lt)],
                             dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * n)


BATCHED_BENCH = """main: n_kv_max = 4160, n_batch = 2048, n_ubatch = 512, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |   16 |   4096 |    5.590 |   366.35 |   10.720 |   191.04 |   16.310 |   251.13 |
"""


def test_llama_outputs_are_read():
    got = peers._llama_batched_parse([BATCHED_BENCH], None)
    assert got == {"prefill_tok_s": 366.35, "decode_tok_s": 191.04, "bench_s": 16.31, "new_tokens": 16 * 128}
    with pytest.raises(ValueError, match="no row"):
        peers._llama_batched_parse([BATCHED_BENCH.replace("|   16 |", "|    8 |")], None)
    base = "perplexity: calculating perplexity over 16 chunks, n_ctx=512, batch_size=512, n_seq=1\n"
    kl = "====== KL divergence statistics ======\nMean    KLD:   0.004106 ±   0.000105\nMaximum KLD:   0.2\n"
    got = peers._llama_kl_parse([base, kl, kl.replace("0.004106", "1.5e-03")], None)
    assert got == {"scored": 2 * 16 * 255, "chunks": 16, "kl_tb": [0.004106, 0.0015]}


def test_ratios_are_paired_medians():
    ds = [{"seconds": s, "peak_rss_mb": 100.0, "scored": 10} for s in (1.0, 2.0, 4.0)]
    peer = [{"seconds": s, "peak_rss_mb": 400.0, "scored": 20} for s in (3.0, 2.0, 2.0)]
    r = run.ratios({"driftscope": ds, "x": peer})["x"]
    assert r["time"]["rounds"] == [3.0, 1.0, 0.5] and r["time"]["median"] == 1.0
    assert (r["time"]["min"], r["time"]["max"]) == (0.5, 3.0)
    assert r["scored_rate"]["rounds"] == [1.5, 0.5, 0.25] and r["rss"]["median"] == 0.25


def test_eval_equal_finds_a_differing_doc():
    doc = {"doc_id": 0, "arguments": [["c", " a"], ["c", " b"]], "ll": [-1.0, -2.0], "acc": 1.0}
    same = {"driftscope": [{"docs": {"m": [doc]}}], "lm-eval hf": [{"docs": {"m": [dict(doc, ll=[-1.0001, -2.0])]}}]}
    assert run.eval_equal(same)["equal"]
    flipped = {"driftscope": [{"docs": {"m": [dict(doc, ll=[-2.0, -1.0], acc=0.0)]}}], "lm-eval hf": same["lm-eval hf"]}
    r = run.eval_equal(flipped)
    assert not r["equal"] and r["acc_differs"] == 1 and r["max_abs_ll_diff"] == pytest.approx(1.0)


def test_j_separate_transformers_passes_are_one_process_each():
    """drift4's "J passes" peer: one hf_drift process per tuned model, each with the base; scored tokens and KL
    values of the J processes added up and listed in tuned order."""
    c = {"base": Path("/b"), "tuned": [Path("/t1"), Path("/t2")], "records": Path("/r.jsonl")}
    cmds = peers._hf_drift_each("full")(c, Path("/wd"))
    assert [cmd[-3:] for cmd in cmds] == [["/b", "/t1", "/r.jsonl"], ["/b", "/t2", "/r.jsonl"]]
    outs = ['log\n{"scored": 10, "kl_tb": [0.5], "kl_bt": [0.25]}', '{"scored": 10, "kl_tb": [0.125], "kl_bt": [1.0]}']
    assert peers._hf_drift_each_parse(outs, Path("/wd")) == {"scored": 20, "kl_tb": [0.5, 0.125],
                                                             "kl_bt": [0.25, 1.0]}
    assert [p.name for p in peers.WORKLOADS["drift4"]][2] == "transformers full logits, J passes"


def test_gemm_rate_is_a_plausible_rate():
    """The probe a peer round records before and after itself: GFLOP/s of one GEMM shape, from a fresh process."""
    from bench.peers import gemm_rate

    assert 0.5 < gemm_rate.rate(m=256, k=64, n=128, calls=3) < 1e5
    assert run.gemm_rate(1) > 0.5
