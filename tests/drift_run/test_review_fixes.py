"""Regression tests from a review of the drift analysis: interrupts inside a batch, per-pair valid_vocab, strict
JSON from a diverged checkpoint, damaged resume state, paper-mode special tokens, clear input errors."""
from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from analysis_helpers import TOKENIZER_FILES, write_base, write_tuned
from safetensors.torch import load_file
from test_drift import _assert_same

from driftscope import drift, load_tokenizer
from driftscope.drift_run import DriftOptions
from driftscope.engine import checkpoint as engine_checkpoint
from driftscope.engine import loader as loader_mod
from driftscope.engine.runner import LockstepRunner
from driftscope.testing import write_checkpoint
from driftscope.errors import InputError
from driftscope.probes import HiddenSimilarity, ShiftedTokens, TokenMetrics

OPTS = {"progress": False, "max_batch_tokens": 64, "checkpoint_every": 0}


@pytest.fixture
def no_html(monkeypatch):
    """Skip report.html (its plots are most of a tiny run's time) in tests that check numbers and state only."""
    import driftscope.report

    monkeypatch.setattr(driftscope.report, "write_report", lambda out, summary: out / "report.html")


def _strict(text: str):
    def no_constant(name):
        raise AssertionError(f"summary.json holds {name}, which strict JSON forbids")

    return json.loads(text, parse_constant=no_constant)


# ---- an interrupt inside a batch must not leave half a batch in the saved state ----------------------------------
BIG = {**OPTS, "max_batch_tokens": 128}  # fewer, larger batches: fewer checkpoints to write


@pytest.fixture(scope="module")
def two_model_run(models, records):
    return drift(models["base"], [models["tuned"], models["late"]], records, **BIG).summary


@pytest.mark.parametrize("where", ["after-token-metrics", "inside-the-forward"])
def test_interrupt_inside_a_batch_resumes_to_the_uninterrupted_result(models, records, tmp_path, monkeypatch, where,
                                                                      two_model_run, no_html):
    # two tuned models (streaming PCA: the shared base moments and both tuned sums are saved and restored)
    tuned = [models["tuned"], models["late"]]
    full = two_model_run
    # the 3rd batch is interrupted after its token metrics were folded in, or after two of its layers were
    cls, nth = (ShiftedTokens, 2 * 2 + 1) if where == "after-token-metrics" else (HiddenSimilarity, 2 * 4 + 3)
    original, calls = cls.update, {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(cls, "update", flaky)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], tuned, records, out, **BIG)
    assert json.loads((out / ".driftscope-state" / "progress.json").read_text())["done"]["mixed"] == 2
    monkeypatch.setattr(cls, "update", original)
    resumed = drift(models["base"], tuned, records, out, resume=True, **BIG).summary
    _assert_same(json.loads(json.dumps(full["models"])), json.loads(json.dumps(resumed["models"])), rel=0)


def test_resume_refuses_a_damaged_state(models, records, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = TokenMetrics.update

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(TokenMetrics, "update", flaky)
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], models["tuned"], records, tmp_path, **OPTS)
    monkeypatch.undo()
    state = tmp_path / ".driftscope-state"
    next(state.glob("t0.*.safetensors")).unlink()  # task 0's probes
    with pytest.raises(ValueError, match="lacks the state of t0"):
        drift(models["base"], models["tuned"], records, tmp_path, resume=True, **OPTS)


# ---- valid_vocab is a property of each (base, tuned) pair ------------------------------------------------------------
def test_a_models_numbers_do_not_depend_on_a_resized_model_beside_it(records, tmp_path):
    base = write_base(tmp_path / "base", vocab=load_tokenizer_size(tmp_path) + 10)  # head padded past the tokenizer
    tuned = write_tuned(base, tmp_path / "tuned", from_layer=1)
    cfg = json.loads((tuned / "config.json").read_text())
    state = load_file(str(tuned / "model.safetensors"))
    n = load_tokenizer(base).vocab_size + 2  # resized: fewer rows than the base head, still covering the tokenizer
    cfg["vocab_size"] = n
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = state[k][:n].clone()
    small = tmp_path / "small"
    write_checkpoint(small, cfg, state)
    for f in TOKENIZER_FILES:
        if (tuned / f).exists():
            shutil.copy(tuned / f, small / f)
    alone = drift(base, tuned, records, **OPTS).summary
    both = drift(base, [tuned, small], records, **OPTS).summary
    assert both["config"]["valid_vocab"] == {"tuned": None, "small": load_tokenizer(base).vocab_size}
    a = json.loads(json.dumps(alone["models"]["tuned"]["tasks"]))
    b = json.loads(json.dumps(both["models"]["tuned"]["tasks"]))
    _assert_same(a, b, rel=1e-9)


def load_tokenizer_size(root) -> int:
    from analysis_helpers import TEXTS

    from driftscope.testing import write_tokenizer

    return load_tokenizer(write_tokenizer(root / "tok", TEXTS, vocab_size=350)).vocab_size


# ---- strict JSON, even from a diverged checkpoint -------------------------------------------------------------------
def test_a_diverged_checkpoint_gives_strict_json_equal_to_the_report(models, records, tmp_path):
    cfg = json.loads((models["tuned"] / "config.json").read_text())
    state = load_file(str(models["tuned"] / "model.safetensors"))
    for part in ("up_proj", "down_proj"):  # finite weights (inf is refused at load) whose product overflows float32:
        name = f"model.layers.2.mlp.{part}.weight"  # layer 2's output is inf, NaN logits from there on
        state[name] = state[name] * 1e30
    bad = tmp_path / "diverged"
    write_checkpoint(bad, cfg, state)
    for f in TOKENIZER_FILES:
        if (models["tuned"] / f).exists():
            shutil.copy(models["tuned"] / f, bad / f)
    for pca in ("streaming", "paper"):
        out = tmp_path / f"out-{pca}"
        report = drift(models["base"], bad, records, out, pca=pca, pca_queries=5, **OPTS)
        disk = _strict((out / "summary.json").read_text())
        assert disk == report.summary
        task = disk["models"]["diverged"]["tasks"]["mixed"]
        assert task["layers"][0]["cosine"] == pytest.approx(1.0) and task["layers"][-1]["pca_shift"] is None
        assert task["kl_tb"]["token_mean"] is None and task["rank_shift"]["token_mean"] is None, task["rank_shift"]
        assert f"{task['tokens']} of {task['tokens']} scored tokens gave non-finite logits" in task["problems"][0]
        assert "layers [3] are null" in task["problems"][1], task["problems"]


def test_summary_on_disk_equals_the_report_and_names_the_run(models, records, tmp_path):
    report = drift(models["base"], models["tuned"], records, tmp_path, resume=True, **OPTS)  # no state: a fresh run
    disk = _strict((tmp_path / "summary.json").read_text())
    assert disk == report.summary
    assert disk["config"]["base"] == str(models["base"]) and disk["config"]["dtype"] == "float32"
    assert disk["versions"]["torch"] == torch.__version__ and disk["machine"]["cpu"]


# ---- paper-mode PCA tokenizes like the paper's tokenizer(texts, ...): special tokens included ----------------------
def test_paper_pca_queries_carry_the_tokenizers_special_tokens(models, records, tmp_path, monkeypatch):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing

    base = tmp_path / "llama-like"
    shutil.copytree(models["base"], base)
    hf = HFTokenizer.from_file(str(base / "tokenizer.json"))
    bos = hf.token_to_id("<|im_start|>")
    hf.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    hf.save(str(base / "tokenizer.json"))
    fed: list[list[int]] = []
    original = LockstepRunner.forward

    def spy(self, input_ids, cu_seqlens, on_layer=None, rows=None, prefix=0):
        if inspect.stack()[1].function == "paper_pca":
            cu = cu_seqlens.tolist()
            fed.extend(input_ids[a:b].tolist() for a, b in zip(cu[:-1], cu[1:]))
        return original(self, input_ids, cu_seqlens, on_layer, rows, prefix)

    monkeypatch.setattr(LockstepRunner, "forward", spy)
    drift(base, models["tuned"], records, pca="paper", pca_queries=4, **OPTS)
    assert len(fed) == 4 and all(q[0] == bos for q in fed), [q[:3] for q in fed]


# ---- inputs and options that cannot work say so up front ----------------------------------------------------------
def test_clear_errors_for_a_directory_and_bad_device_or_dtype(models, tmp_path):
    with pytest.raises(InputError, match="--data .* is a directory"):
        drift(models["base"], models["tuned"], tmp_path, **OPTS)
    with pytest.raises(ValueError, match="dtype=.float33. is not supported; expected one of"):
        DriftOptions(dtype="float33")
    with pytest.raises(ValueError, match="not a torch device"):
        DriftOptions(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DriftOptions(device="cuda")
    assert DriftOptions(dtype=torch.bfloat16).dtype == "bfloat16"


# ---- resume refuses inputs that changed in place ---------------------------------------------------------------------
@pytest.mark.parametrize("change", ["checkpoint", "pca_texts"])
def test_resume_refuses_inputs_changed_in_place(models, records, tmp_path, monkeypatch, change):
    tuned = tmp_path / "tuned"
    shutil.copytree(models["tuned"], tuned)
    queries = tmp_path / "queries.txt"
    queries.write_text("first query text here\nsecond query text\nthird one\n")
    opts = {**OPTS, "pca": "paper", "pca_texts": str(queries), "pca_queries": 3}

    def boom(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShiftedTokens, "update", boom)
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], tuned, records, tmp_path / "out", **opts)
    if change == "checkpoint":  # re-staged (copied again: new mtime, same bytes): still resumable
        os.utime(tuned / "model.safetensors", ns=(1, 1))
        with pytest.raises(KeyboardInterrupt):
            drift(models["base"], tuned, records, tmp_path / "out", resume=True, **opts)
    monkeypatch.undo()
    if change == "checkpoint":  # the tuned checkpoint re-saved at the same path (a later training step)
        write_tuned(models["base"], tuned, from_layer=1, seed=7)
    else:
        queries.write_text("other queries now\nanother\nand a third\n")
    with pytest.raises(ValueError, match="checkpoints differ" if change == "checkpoint" else "pca_texts differ"):
        drift(models["base"], tuned, records, tmp_path / "out", resume=True, **opts)


def test_a_byte_identical_tokenizer_copy_is_not_loaded_again(models, records, monkeypatch):
    from driftscope.drift_run import plan as plan_mod

    loaded = []
    real = engine_checkpoint.load_tokenizer

    def counting(path):
        loaded.append(Path(path))
        return real(path)

    monkeypatch.setattr(engine_checkpoint, "load_tokenizer", counting)
    plan_mod.plan(models["base"], [models["tuned"], models["late"]], records, plan_mod.DriftOptions(progress=False))
    assert (models["tuned"] / "tokenizer.json").read_bytes() == (models["base"] / "tokenizer.json").read_bytes()
    assert loaded == [Path(models["base"])], "identical copies need no second load and no comparison"


def test_tokenizers_with_the_same_vocabulary_but_other_merges_are_refused(models, records, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(models["tuned"], tuned)
    tj = json.loads((tuned / "tokenizer.json").read_text())
    tj["model"]["merges"] = tj["model"]["merges"][1:]  # same vocabulary, one merge fewer: other ids for some text
    (tuned / "tokenizer.json").write_text(json.dumps(tj))
    assert load_tokenizer(tuned).get_vocab() == load_tokenizer(models["base"]).get_vocab()
    with pytest.raises(ValueError, match="same vocabulary but encode differently"):
        drift(models["base"], tuned, records, **OPTS)


# ---- one base against several tuned models: the base PCA moments are accumulated once ------------------------------
def test_streaming_pca_base_moments_are_computed_once_for_several_tuned_models(models, records, monkeypatch):
    import driftscope.drift_run.bundle as bundle_mod
    import driftscope.probes.hidden_similarity as hs_mod
    import driftscope.probes.pca as pca_mod

    calls = {"n": 0}
    original = pca_mod.batch_gram

    def counting(x):
        calls["n"] += 1
        return original(x)

    for mod in (bundle_mod, hs_mod, pca_mod):  # wherever the base states' Σx, XᵀX are computed
        monkeypatch.setattr(mod, "batch_gram", counting)
    both = drift(models["base"], [models["tuned"], models["late"]], records, **OPTS).summary
    n_both = calls["n"]
    calls["n"] = 0
    single = drift(models["base"], models["late"], records, **OPTS).summary
    assert n_both == calls["n"], "Σxxᵀ of the base states must not be recomputed for every tuned model"
    for name in ("tuned", "late"):
        assert both["models"][name]["tasks"]["mixed"]["pca"]["mode"] == "streaming"
    # the second model's PCA shift is bitwise the one it gets alone
    assert both["models"]["late"]["tasks"]["mixed"]["pca"] == single["models"]["late"]["tasks"]["mixed"]["pca"]


def test_resume_with_several_tuned_models_and_tasks(models, tmp_path, monkeypatch, no_html, pca="paper"):
    from analysis_helpers import write_records

    from driftscope.drift_run import run as run_mod
    from driftscope.probes import PaperPCAShift

    data = [write_records(tmp_path / "a.jsonl", n=5), write_records(tmp_path / "b.jsonl", n=4)]
    tuned = [models["tuned"], models["late"]]
    opts = {**BIG, "pca": pca, "pca_queries": 3}
    full = drift(models["base"], tuned, data, None, **opts).summary
    out = tmp_path / "cut"
    # 1st interrupt: inside the first batch of the second task, after model 0's token metrics were folded in
    where = {"k": None, "j": 0}
    process, update = run_mod._Run.process, TokenMetrics.update

    def tracking(self, k, batch):
        where["k"], where["j"] = k, 0
        return process(self, k, batch)

    def flaky(self, *a, **kw):
        if where["k"] == 1 and where["j"] == 1:
            raise KeyboardInterrupt
        where["j"] += 1
        return update(self, *a, **kw)

    monkeypatch.setattr(run_mod._Run, "process", tracking)
    monkeypatch.setattr(TokenMetrics, "update", flaky)
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], tuned, data, out, **opts)
    monkeypatch.setattr(run_mod._Run, "process", process)
    monkeypatch.setattr(TokenMetrics, "update", update)
    # 2nd interrupt (paper): inside the second task's PCA phase, after model 0's PCA was built
    if pca == "paper":
        calls, pupdate = {"n": 0}, PaperPCAShift.update

        def flaky_pca(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 2 * 4 + 4 + 2:  # task 1, model 1, layer 1
                raise KeyboardInterrupt
            return pupdate(self, *a, **kw)

        monkeypatch.setattr(PaperPCAShift, "update", flaky_pca)
        with pytest.raises(KeyboardInterrupt):  # the resumed run redoes task 0's PCA (not done), then task 1's
            drift(models["base"], tuned, data, out, resume=True, **opts)
        monkeypatch.setattr(PaperPCAShift, "update", pupdate)
    resumed = drift(models["base"], tuned, data, out, resume=True, **opts).summary
    _assert_same(json.loads(json.dumps(full["models"])), json.loads(json.dumps(resumed["models"])), rel=0)


# ---- memory: packed batches exist one at a time, not for the whole dataset -------------------------------------------
def test_packed_batches_are_built_one_at_a_time(models, records, tmp_path, monkeypatch):
    import gc
    import weakref

    import driftscope.engine.data as data_mod
    from driftscope.drift_run import run as run_mod

    big = tmp_path / "big.jsonl"
    big.write_text(records.read_text() * 2)
    alive: list[weakref.ref] = []
    build = data_mod._build

    def tracked(samples):
        b = build(samples)
        alive.append(weakref.ref(b))
        return b

    monkeypatch.setattr(data_mod, "_build", tracked)
    peak = {"n": 0, "calls": 0}
    process = run_mod._Run.process

    def watching(self, k, batch):
        peak["calls"] += 1
        if peak["calls"] in (3, 8):
            gc.collect()
            peak["n"] = max(peak["n"], sum(r() is not None for r in alive))
        return process(self, k, batch)

    monkeypatch.setattr(run_mod._Run, "process", watching)
    drift(models["base"], models["tuned"], big, **OPTS)
    assert len(alive) >= 8 and peak["n"] <= 2, f"{peak['n']} of {len(alive)} packed batches alive at once"


# ---- bfloat16 end to end ---------------------------------------------------------------------------------------------
def test_bfloat16_run_agrees_with_float32(models, records):
    runs = {dt: drift(models["base"], models["tuned"], records, dtype=dt, pca="paper", pca_queries=5,
                      **OPTS).summary["models"]["tuned"]["tasks"]["mixed"] for dt in ("float32", "bfloat16")}
    a, b = runs["float32"], runs["bfloat16"]
    assert a["tokens"] == b["tokens"] and a["samples"] == b["samples"]
    for k in ("kl_tb", "kl_bt"):
        assert b[k]["token_mean"] == pytest.approx(a[k]["token_mean"], rel=0.05), k
    assert b["top1_agreement"] == pytest.approx(a["top1_agreement"], abs=0.05)
    for ra, rb in zip(a["layers"], b["layers"]):
        assert rb["cosine"] == pytest.approx(ra["cosine"], abs=0.02), ra["layer"]
        assert rb["pca_shift"] == pytest.approx(ra["pca_shift"], abs=0.05 * max(1.0, abs(ra["pca_shift"]))), ra["layer"]


def test_a_layer_count_mismatch_is_refused_before_any_weights_load(models, records, tmp_path, monkeypatch):

    other = write_base(tmp_path / "two-layers", layers=2)
    loads = {"n": 0}
    load_model = loader_mod.load_model

    def counting(*a, **kw):
        loads["n"] += 1
        return load_model(*a, **kw)

    monkeypatch.setattr(loader_mod, "load_model", counting)
    with pytest.raises(ValueError) as e:
        drift(models["base"], [models["tuned"], other], records, **OPTS)
    msg = str(e.value)
    assert "num_layers" in msg and "num_hidden_layers" in msg, msg
    assert str(models["base"] / "config.json") in msg and str(other / "config.json") in msg, msg
    assert loads["n"] == 0, "the configs disagree: no checkpoint should be loaded"


def test_checkpoints_never_dominate_the_run_time(models, records, tmp_path, monkeypatch, no_html):
    import time

    from driftscope.drift_run import run as run_mod
    from driftscope.drift_run.checkpoint import RunState

    big = tmp_path / "big.jsonl"
    big.write_text(records.read_text() * 2)
    saves, batches = {"n": 0}, {"n": 0}
    save, process = RunState.save, run_mod._Run.process

    def slow_save(self, *a, **kw):  # a large state: each save takes far longer than a batch
        saves["n"] += 1
        time.sleep(0.1)
        return save(self, *a, **kw)

    def counting(self, *a, **kw):
        batches["n"] += 1
        return process(self, *a, **kw)

    monkeypatch.setattr(RunState, "save", slow_save)
    monkeypatch.setattr(run_mod._Run, "process", counting)
    drift(models["base"], models["tuned"], big, tmp_path / "out", **{**OPTS, "checkpoint_every": 1e-3})
    print(saves, batches)
    assert batches["n"] >= 20 and saves["n"] <= batches["n"] // 3, (saves, batches)


def test_a_tokenizer_with_ids_beyond_the_checkpoints_vocabulary_is_named(records, tmp_path):
    base = write_base(tmp_path / "base", vocab=300)  # the tokenizer written beside it has 350 ids
    tuned = write_tuned(base, tmp_path / "tuned", from_layer=1)
    with pytest.raises(ValueError, match=r"has no row in .*config.json \(vocab_size 300\)"):
        drift(base, tuned, records, **OPTS)


@pytest.mark.parametrize("content", ["", "not json\n{\"a\": 1}\n"], ids=["empty", "all-bad"])
def test_unusable_data_is_refused_before_any_weights_load(models, tmp_path, monkeypatch, content):

    data = tmp_path / "data.jsonl"
    data.write_text(content)
    monkeypatch.setattr(loader_mod, "load_model", lambda *a, **kw: pytest.fail("weights loaded for unusable data"))
    with pytest.raises(ValueError, match=f"{data}: no usable record"):
        drift(models["base"], models["tuned"], data, **OPTS)


def test_a_single_scored_token_gives_an_undefined_pca_not_a_crash_at_the_end(models, tmp_path, monkeypatch):

    data = tmp_path / "one.jsonl"
    data.write_text('{"prompt": "The sum of", "response": " the"}\n')
    report = drift(models["base"], models["tuned"], data, tmp_path / "out", **OPTS)
    task = report.summary["models"]["tuned"]["tasks"]["one"]
    assert task["tokens"] == 1 and task["pca"]["records"] == [] and "at least 2" in task["pca"]["undefined"]
    assert _strict((tmp_path / "out" / "summary.json").read_text()) == report.summary
    # paper mode with one query text: refused before any weights load, not after the batches
    monkeypatch.setattr(loader_mod, "load_model", lambda *a, **kw: pytest.fail("weights loaded for an impossible PCA"))
    with pytest.raises(ValueError, match="at least 2 query texts"):
        drift(models["base"], models["tuned"], data, pca="paper", **OPTS)


def test_the_lockstep_runner_prepares_each_batch_once_for_models_that_agree(models, monkeypatch):
    from driftscope import load_model
    from driftscope.engine.model import Transformer

    base, a, b = (load_model(models[n]) for n in ("base", "tuned", "late"))
    calls = {"n": 0}
    prepare = Transformer.prepare

    def counting(self, *args, **kw):
        calls["n"] += 1
        return prepare(self, *args, **kw)

    monkeypatch.setattr(Transformer, "prepare", counting)
    ids = torch.arange(1, 21, dtype=torch.int64)
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    hb, hts = LockstepRunner(base, [a, b]).forward(ids, cu)
    assert calls["n"] == 1, "same dtype and rope: one set of rope tables per batch, not one per model"
    ref = base.forward(ids, cu).hidden
    assert torch.equal(hb, ref) and torch.equal(hts[0], a.forward(ids, cu).hidden)
    b.inv_freq = b.inv_freq * 0.5  # a tuned model with another rope base gets its own tables
    calls["n"] = 0
    LockstepRunner(base, [a, b]).forward(ids, cu)
    assert calls["n"] == 2
