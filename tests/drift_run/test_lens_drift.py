"""The logit lens through a drift run (summary.json's "lens", "self_lens", "promoted_tokens") against float64
transformers hidden states, norm and head; TaskProbes' lens merge (merge_kind) and state round trip; a planted
change that the promoted tokens must find."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from analysis_helpers import TEXTS, TOKENIZER_FILES, reference_tokens

import driftscope.drift_run.run as run_mod
from driftscope import drift, load_tokenizer
from driftscope.drift_run.bundle import TaskProbes, merge_kind
from driftscope.engine import loader as loader_mod
from driftscope.drift_run.summary import metric_block
from driftscope.engine.config import ModelConfig
from driftscope.kernels.vocab_probe import vocab_probe
from driftscope.probes.lens import LensHeads, LensModel
from driftscope.probes.token_metrics import MEANS
from driftscope.records import load_samples
from driftscope.testing import hf_config, random_state_dict, write_checkpoint, write_tokenizer

OPTS = {"progress": False, "max_batch_tokens": 96, "pca": "none"}


@pytest.fixture(scope="module")
def lens_run(models, records, tmp_path_factory):
    out = tmp_path_factory.mktemp("lens-drift")
    original, calls = run_mod._Run.process, {"n": 0}

    def counted(self, k, batch):
        calls["n"] += 1
        return original(self, k, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod._Run, "process", counted)
        report = drift(models["base"], [models["tuned"], models["late"]], records, out, **OPTS, lens="all",
                       examples=3)
    assert json.loads((out / "summary.json").read_text())["models"] == report.summary["models"]
    return report.summary["models"] | {"_out": out, "_batches": calls["n"]}


def test_report_has_the_lens_section(lens_run):
    from driftscope.report import plots

    page = (lens_run["_out"] / "report.html").read_text()
    assert page.count("<h3>Logit lens</h3>") == 2  # one per (model, task)
    assert "Logit lens per index (4 indices, token means)" in page and "Promoted / suppressed tokens" in page
    assert page.count("Top 3 samples by mean KL") == 2 and page.count("Top 3 tokens by KL") == 2
    assert "background:rgba(220,40,40,1.00)" in page  # the sample holding the largest per-token KL
    if plots.unavailable() is None:
        assert 'alt="logit lens, tuned / mixed"' in page and 'alt="logit lens, late / mixed"' in page


def test_index_L_is_the_output_probe_bit_for_bit(lens_run):
    for name in ("tuned", "late"):
        task = lens_run[name]["tasks"]["mixed"]
        assert [r["index"] for r in task["lens"]] == [0, 1, 2, 3]
        keys = set(task["lens"][-1]) - {"index"}
        assert keys == {"tokens", "samples", *MEANS, "sampled_kl", "top1_agreement"}
        assert {k: task["lens"][-1][k] for k in keys} == {k: task[k] for k in keys}
        assert task["tokens"] > 0 and task["kl_tb"]["token_mean"] > 0


def test_the_output_probe_from_the_lens_calls_equals_its_own_call(lens_run, models, records):
    """With the lens on, the output probe's results come from the lens's vocab_probe_pairs calls (no GEMM of its
    own): every number of the run equals a run whose output probe makes its own vocab_probe call."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskProbes, "outputs_from_lens", lambda self, targets: None)
        own = drift(models["base"], [models["tuned"], models["late"]], records, **OPTS, lens="all",
                    examples=3).summary["models"]
    assert own == {k: v for k, v in lens_run.items() if not k.startswith("_")}
    with pytest.MonkeyPatch.context() as mp:  # and the lens run made no vocab_probe call of its own
        mp.setattr(run_mod, "vocab_probe", lambda *a, **k: pytest.fail("the output probe ran its own call"))
        drift(models["base"], models["tuned"], records, **OPTS, lens="every:2")


def test_equal_layers_give_zero_lens_kl(lens_run):
    late = lens_run["late"]["tasks"]["mixed"]  # only layer 2 (the last) changed: states 0, 1, 2 are equal
    for row in late["lens"][:3]:
        assert row["kl_tb"]["token_mean"] == 0 and row["kl_bt"]["token_mean"] == 0, row["index"]
        assert row["top1_agreement"] == 1 and row["rank_shift"]["token_mean"] == 0
    assert late["lens"][3]["kl_tb"]["token_mean"] > 1e-4
    for who in ("base", "tuned"):  # each model against itself at L
        assert lens_run["late"]["tasks"]["mixed"]["self_lens"][who][-1]["kl_bt"]["token_mean"] == 0


@torch.no_grad()
def test_lens_against_float64_transformers(lens_run, models, records):
    import transformers

    samples, _ = load_samples(records, load_tokenizer(models["base"]))
    hf = {k: transformers.AutoModelForCausalLM.from_pretrained(models[k], dtype=torch.float64,
                                                               attn_implementation="eager") for k in ("base", "tuned")}
    cols: dict[tuple, list] = {}
    for s in samples:
        a, b = s.first_scored, len(s.input_ids) - 1
        y = s.input_ids[a + 1:b + 1]
        hs = {k: m(s.input_ids[None], output_hidden_states=True).hidden_states for k, m in hf.items()}
        for i in (0, 1, 2):  # three indices below L: the lens applies each model's own final norm and head
            z = {k: hf[k].lm_head(hf[k].model.norm(hs[k][i][0, a:b])) for k in hf}
            lq, lp = torch.log_softmax(z["base"], -1), torch.log_softmax(z["tuned"], -1)
            cols.setdefault((i, "kl_tb"), []).append((lp.exp() * (lp - lq)).sum(-1))
            cols.setdefault((i, "kl_bt"), []).append((lq.exp() * (lq - lp)).sum(-1))
            cols.setdefault((i, "logp_tuned"), []).append(lp.gather(1, y[:, None])[:, 0])
            cols.setdefault((i, "top1_agree"), []).append((z["base"].argmax(-1) == z["tuned"].argmax(-1)).double())
            zl = z["base"]  # self-lens of the base: KL(output ‖ lens_i)
            lo = torch.log_softmax(hf["base"].lm_head(hs["base"][-1][0, a:b]), -1)
            lz = torch.log_softmax(zl, -1)
            cols.setdefault((i, "self_kl"), []).append((lo.exp() * (lo - lz)).sum(-1))
    task = lens_run["tuned"]["tasks"]["mixed"]
    for i in (0, 1, 2):
        got = task["lens"][i]
        assert got["index"] == i
        for name in ("kl_tb", "kl_bt", "logp_tuned"):
            want = torch.cat(cols[(i, name)]).mean().item()
            assert got[name]["token_mean"] == pytest.approx(want, abs=2e-5), (i, name)
        assert got["top1_agreement"] == pytest.approx(torch.cat(cols[(i, "top1_agree")]).mean().item(), abs=1e-12)
        want = torch.cat(cols[(i, "self_kl")]).mean().item()
        assert task["self_lens"]["base"][i]["kl_bt"]["token_mean"] == pytest.approx(want, abs=2e-5), i
    assert task["lens"][1]["kl_tb"]["token_mean"] > 1e-3  # layers 1.. changed: the lens sees it


# ---- TaskProbes: merge across ranks (merge_kind) and state round trip -----------------------------------------------
D, V, NS = 16, 61, 4


def _heads(n_tuned: int) -> LensHeads:
    g = torch.Generator().manual_seed(0)
    def model():
        gamma = 1 + 0.1 * torch.randn(D, generator=g)
        return LensModel(lambda h, gm=gamma: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * gm,
                         torch.randn(V, D, generator=g), gamma)
    return LensHeads([0, 2, NS - 1], NS, model(), [model() for _ in range(n_tuned)], [None] * n_tuned, top_k=4)


def _feed(probes: TaskProbes, heads: LensHeads, seeds) -> None:
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        n = 12 + s
        hs = [(torch.randn(n, D, generator=g), [torch.randn(n, D, generator=g) for _ in heads.tuned])
              for _ in range(NS)]
        for i, (hb, hts) in enumerate(hs):
            if i == NS - 1:
                hb, hts = heads.base.norm(hb), [m.norm(h) for m, h in zip(heads.tuned, hts)]
            probes.on_layer(i, hb, hts)
        y = torch.randint(0, V, (n,), generator=g)
        sids, first = 1000 * s + torch.arange(n) // 4, torch.arange(n) % 4 == 0
        hb, hts = hs[-1][0], hs[-1][1]
        hb, hts = heads.base.norm(hb), [m.norm(h) for m, h in zip(heads.tuned, hts)]
        rs = vocab_probe(hb, heads.base.head, hts, [m.head for m in heads.tuned], y)
        for j, r in enumerate(rs):
            probes.on_vocab(j, r, y, sids, first)


def _probes(heads, examples: int = 3):
    return TaskProbes(len(heads.tuned), NS, D, vocab_rows=V, pca="none", cka="none", cka_proj_dim=8, lens=heads,
                      examples=examples)


def test_task_probes_lens_merge_and_round_trip():
    heads = _heads(2)
    one, r0, r1 = _probes(heads), _probes(heads), _probes(heads)
    _feed(one, heads, [1, 2, 3, 4])
    _feed(r0, heads, [1, 2])
    _feed(r1, heads, [3, 4])
    s0, s1 = r0.state_dict(), r1.state_dict()
    assert any(k.startswith("lens.") for k in s0)
    merged = {}
    for k in s0:  # what distributed.World.merge does with merge_kind, in rank order
        kind = merge_kind(k)
        merged[k] = s0[k] + s1[k] if kind == "sum" else torch.cat([s0[k], s1[k]]) if kind == "cat" else s0[k]
    restored = _probes(heads)
    restored.load_state_dict(merged)
    decode = lambda t: f"<{t}>"
    for j in range(2):
        a, b = restored.finalize(j, decode, 5, []), one.finalize(j, decode, 5, [])
        assert a["lens"] == b["lens"] and a["self_lens"] == b["self_lens"]
        assert same_examples(a["examples"], b["examples"])
        assert len(a["examples"]["top_tokens"]) == 3
        assert [[r["id"] for r in p["promoted"]] for p in a["promoted_tokens"]] == \
               [[r["id"] for r in p["promoted"]] for p in b["promoted_tokens"]]
        assert a["lens"][-1] | {"index": None} == {"index": None, **metric_block_of(one, j)}
    again = _probes(heads)
    again.load_state_dict(one.state_dict())
    assert again.finalize(0, decode, 5, []) == one.finalize(0, decode, 5, [])  # a round trip: bit for bit
    with pytest.raises(ValueError, match="lens"):
        TaskProbes(2, NS, D, vocab_rows=V, pca="none", cka="none", cka_proj_dim=8, lens=heads,
                   shared_base=False)
    plain = TaskProbes(2, NS, D, vocab_rows=V, pca="none", cka="none", cka_proj_dim=8)
    assert not any(k.startswith("lens.") or ".examples." in k for k in plain.state_dict())  # off: as it was
    off = LensHeads([], NS, heads.base, heads.tuned, [None, None])  # heads without lens indices nor examples
    quiet = TaskProbes(2, NS, D, vocab_rows=V, pca="none", cka="none", cka_proj_dim=8, lens=off, shared_base=False)
    plain_gen = TaskProbes(2, NS, D, vocab_rows=V, pca="none", cka="none", cka_proj_dim=8, shared_base=False)
    assert quiet.lens is None and not quiet.keep_final and quiet.state_dict().keys() == plain_gen.state_dict().keys()
    with pytest.raises(ValueError, match="lens"):
        _probes(heads, examples=0).load_state_dict(plain.state_dict())


def same_examples(a: dict, b: dict) -> bool:
    """Equal stores: every field exactly but the top-n probabilities, float32 logits of the rows that entered together
    (a GEMM's rounding may depend on how many rows it has), within 1e-6."""
    strip = lambda ex: {**ex, "top_tokens": [{**t, "base_top": [x["id"] for x in t["base_top"]],
                                               "tuned_top": [x["id"] for x in t["tuned_top"]]}
                                              for t in ex["top_tokens"]]}
    ps = lambda ex: [x["p"] for t in ex["top_tokens"] for x in t["base_top"] + t["tuned_top"]]
    return strip(a) == strip(b) and ps(a) == pytest.approx(ps(b), rel=1e-6, abs=1e-7)


def metric_block_of(probes: TaskProbes, j: int) -> dict:
    return metric_block(probes.pairs[j].tokens.finalize())


# ---- a planted change: layer k's down_proj bias shifted along token t's head row (divided by γ) ----------------------
def test_planted_change_is_the_top_promoted_token(tmp_path):
    k, t, c, layers = 1, 37, 4.0, 4
    tok_dir = write_tokenizer(tmp_path / "base", TEXTS, vocab_size=350)
    vocab = load_tokenizer(tok_dir).vocab_size
    cfg = hf_config("llama", vocab_size=vocab, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2,
                    intermediate_size=128) | {"mlp_bias": True}
    sd = random_state_dict(ModelConfig.from_dict(cfg, source="planted"), seed=3)
    write_checkpoint(tmp_path / "base", cfg, sd)
    gamma, row = sd["model.norm.weight"], sd["lm_head.weight"][t]
    tuned = dict(sd)
    tuned[f"model.layers.{k}.mlp.down_proj.bias"] = sd[f"model.layers.{k}.mlp.down_proj.bias"] + c * row / gamma
    write_checkpoint(tmp_path / "tuned", cfg, tuned)
    for f in TOKENIZER_FILES:
        if (tmp_path / "base" / f).exists():
            shutil.copy(tmp_path / "base" / f, tmp_path / "tuned" / f)
    records = tmp_path / "mixed.jsonl"
    records.write_text("".join(json.dumps({"prompt": x[:15], "response": x[15:]}) + "\n" for x in TEXTS[:6]))
    task = drift(tmp_path / "base", tmp_path / "tuned", records, **OPTS, lens="all", lens_top_k=3).summary[
        "models"]["tuned"]["tasks"]["mixed"]
    promoted = task["promoted_tokens"]
    assert [p["index"] for p in promoted] == list(range(layers + 1))
    for p in promoted[:k + 1]:  # before layer k's output (index k + 1): the states are equal, nothing promoted
        assert all(r["score"] == 0 for r in p["promoted"] + p["suppressed"]), p
    for p in promoted[k + 1:]:
        assert p["promoted"][0]["id"] == t, p
        assert p["promoted"][0]["score"] > 0 > p["suppressed"][0]["score"]
        assert p["promoted"][0]["text"] == load_tokenizer(tok_dir).decode([t])


# ---- the example stores through a drift run, against float64 transformers ------------------------------------------
@torch.no_grad()
def test_examples_against_float64_transformers(lens_run, models, records):
    import transformers

    samples, _ = load_samples(records, load_tokenizer(models["base"]))
    r = reference_tokens(models["base"], models["tuned"], samples)
    ex = lens_run["tuned"]["tasks"]["mixed"]["examples"]
    sid, kl = r["sample_id"], r["kl_tb"]
    pos = torch.cat([torch.arange(int((sid == s).sum())) for s in sid.unique_consecutive().tolist()])
    means = sorted(((kl[sid == s].mean().item(), s) for s in sid.unique().tolist()), key=lambda x: (-x[0], x[1]))
    assert [x["sample_id"] for x in ex["top_samples"]] == [s for _, s in means[:3]]
    for got, (m, s) in zip(ex["top_samples"], means):
        assert got["mean_kl"] == pytest.approx(m, abs=2e-5)
        sample = samples_by_id(samples)[s]
        assert got["token_ids"] == sample.input_ids[sample.first_scored + 1:].tolist()
    order = torch.argsort(kl, descending=True)[:3]
    assert [(x["sample_id"], x["position"]) for x in ex["top_tokens"]] == \
        [(int(sid[i]), int(pos[i])) for i in order]
    hf = {k: transformers.AutoModelForCausalLM.from_pretrained(models[k], dtype=torch.float64,
                                                               attn_implementation="eager") for k in ("base", "tuned")}
    by_id = samples_by_id(samples)
    for x in ex["top_tokens"]:
        assert x["kl"] == pytest.approx(float(kl[(sid == x["sample_id"])][x["position"]]), abs=2e-5)
        s = by_id[x["sample_id"]]
        at = s.first_scored + x["position"]  # the row predicting input_ids[at + 1]
        ids = s.input_ids[s.first_scored + 1:]
        assert x["context_ids"][8] == int(ids[x["position"]])  # window 8: the token itself in the middle
        for who, key in (("base", "base_top"), ("tuned", "tuned_top")):
            p = torch.softmax(hf[who](s.input_ids[None]).logits[0, at], -1)
            want = torch.topk(p, 5)
            assert [t["id"] for t in x[key]] == want.indices.tolist(), (who, x)
            assert [t["p"] for t in x[key]] == pytest.approx(want.values.tolist(), abs=1e-5)


def samples_by_id(samples) -> dict:
    return {s.sample_id: s for s in samples}


def test_interrupted_run_resumes_to_the_same_lens_and_examples(models, records, tmp_path, lens_run):
    """Ctrl-C in the third batch (the state saved after every batch), then --resume: the same summary blocks as the
    uninterrupted run (same batches, same order: bit for bit)."""
    original, calls = run_mod._Run.process, {"n": 0}

    def flaky(self, k, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, k, batch)

    opts = {**OPTS, "lens": "all", "examples": 3, "checkpoint_every": 0, "report": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod._Run, "process", flaky)
        with pytest.raises(KeyboardInterrupt):
            drift(models["base"], [models["tuned"], models["late"]], records, tmp_path, **opts)
        assert calls["n"] == 3
        resumed = drift(models["base"], [models["tuned"], models["late"]], records, tmp_path, **opts, resume=True)
    assert calls["n"] == 3 + lens_run["_batches"] - 2  # the resumed run did only the batches after the saved two
    for name in ("tuned", "late"):
        got, want = resumed.summary["models"][name]["tasks"]["mixed"], lens_run[name]["tasks"]["mixed"]
        for key in ("lens", "self_lens", "promoted_tokens", "examples"):
            assert got[key] == want[key], (name, key)


@pytest.mark.parametrize("opts, match", [
    ({"lens": "every:0"}, "--lens"), ({"lens": "1,x"}, "--lens"), ({"lens": "-2"}, "--lens"),
    ({"lens": "all", "generate": True}, "--lens"), ({"examples": 2, "generate": True}, "--examples"),
    ({"examples": -1}, "--examples"),
])
def test_options_refused_in_one_line(opts, match):
    from driftscope.drift_run.options import DriftOptions
    from driftscope.errors import InputError

    with pytest.raises(InputError, match=match) as e:
        DriftOptions(**opts)
    assert "\n" not in str(e.value)


def test_lens_index_beyond_the_model_refused(models, records):
    from driftscope.errors import InputError

    with pytest.MonkeyPatch.context() as mp:  # refused by the plan: no weights load
        mp.setattr(loader_mod, "load_model", lambda *a, **kw: pytest.fail("weights loaded before the refusal"))
        with pytest.raises(InputError, match=r"\[0, 3\]"):
            drift(models["base"], models["tuned"], records, **OPTS, lens="0,9")
