"""The examples table (--examples K): examples.parquet / .jsonl written by a drift run round-trips to summary.json's
"examples" (one row per stored top-KL token, the store's order), cross-checked against the top-samples store and the
tokenizer; JSONL without pyarrow has the same rows; no table (and a stale one removed) without examples."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
from report_helpers import block_import

from driftscope import drift, load_tokenizer
from driftscope.drift_run.outputs import write_outputs
from driftscope.report.tables import EXAMPLE_COLUMNS, example_rows, read_token_table
from driftscope.testing import random_checkpoint, write_tokenizer
from driftscope.util import write_jsonl

TEXTS = [f"Item {i}: the <b>{i * 7}</b> apples & {i + 2} pears, «naïve» café {'🙂' * (i % 3)}." for i in range(12)]
K = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    base, tuned = root / "base", root / "tuned"
    write_tokenizer(base, TEXTS, vocab_size=300)
    cfg = dict(vocab_size=load_tokenizer(base).vocab_size, hidden_size=32, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=16, intermediate_size=64)
    random_checkpoint(base, seed=0, **cfg)
    random_checkpoint(tuned, seed=1, **cfg)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, tuned / f)
    data = [write_jsonl(root / "a.jsonl", [{"prompt": "Count.", "response": t} for t in TEXTS[:7]]),
            write_jsonl(root / "b.jsonl", [{"prompt": "Again.", "response": t} for t in TEXTS[7:]])]
    out = root / "out"
    drift(base, tuned, data, out, progress=False, pca="none", report=False, examples=K, max_batch_tokens=128)
    return {"out": out, "summary": json.loads((out / "summary.json").read_text()), "base": base}


def _table(out):
    (path,) = [p for p in out.iterdir() if p.name.startswith("examples.")]
    return path, read_token_table(path)


def test_table_round_trips_to_summary_examples(run):
    path, rows = _table(run["out"])
    assert rows and all(list(r) == list(EXAMPLE_COLUMNS) for r in rows)
    decode = load_tokenizer(run["base"]).decode
    n, crossed = 0, 0
    for model, m in run["summary"]["models"].items():
        for task, t in m["tasks"].items():  # an independent walk of summary.json's layout
            ex = t["examples"]
            got = [r for r in rows if (r["model"], r["task"]) == (model, task)]
            assert len(got) == len(ex["top_tokens"]) == K, (model, task)
            samples = {s["sample_id"]: s for s in ex["top_samples"]}
            for r, want in zip(got, ex["top_tokens"]):  # the store's order: KL descending
                assert (r["sample_id"], r["position"], r["kl"]) == (want["sample_id"], want["position"], want["kl"])
                assert r["context_ids"] == want["context_ids"] and r["context_texts"] == want["context_texts"]
                assert r["target_id"] == want["context_ids"][ex["window"]]
                assert r["target_text"] == decode([r["target_id"]])
                for who in ("base", "tuned"):
                    top = want[f"{who}_top"]
                    assert r[f"{who}_top_ids"] == [e["id"] for e in top] and len(top) == 5
                    assert r[f"{who}_top_p"] == [e["p"] for e in top]  # float64 in the file: exact
                    assert r[f"{who}_top_texts"] == [decode([e["id"]]) for e in top]
                    p = r[f"{who}_top_p"]
                    assert p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-6
                s = samples.get(r["sample_id"])  # the other store holds the same sample's tokens and KL
                if s is not None:
                    assert s["token_ids"][r["position"]] == r["target_id"]
                    assert s["kl"][r["position"]] == pytest.approx(r["kl"], rel=1e-6)
                    crossed += 1
            assert [r["kl"] for r in got] == sorted((r["kl"] for r in got), reverse=True) and got[-1]["kl"] > 0
            n += len(got)
    assert n == len(rows) and crossed > 0


def test_jsonl_without_pyarrow_same_rows(run, tmp_path, monkeypatch):
    _, want = _table(run["out"])
    block_import(monkeypatch, "pyarrow")
    files = write_outputs(tmp_path, run["summary"], [], report=False)
    assert files["examples"] == tmp_path / "examples.jsonl"
    assert read_token_table(files["examples"]) == want


def test_no_decoder_texts_are_none_and_null_p_stays_null(run, tmp_path):
    summary = copy.deepcopy(run["summary"])
    for m in summary["models"].values():
        for t in m["tasks"].values():
            for r in t["examples"]["top_tokens"]:
                r.pop("context_texts")
                for e in r["base_top"] + r["tuned_top"]:
                    e.pop("text")
                r["base_top"][1]["p"] = None  # a NaN probability, as summary.json holds it
    rows = read_token_table(write_outputs(tmp_path, summary, [], report=False)["examples"])
    assert rows and all(r["target_text"] is None and r["context_texts"] is None and r["tuned_top_texts"] is None
                        for r in rows)
    assert all(r["base_top_p"][1] is None for r in rows)
    assert [r["target_id"] for r in rows] == [r["target_id"] for r in example_rows(run["summary"])]


def test_no_examples_no_table_and_a_stale_one_removed(run, tmp_path):
    summary = copy.deepcopy(run["summary"])
    for m in summary["models"].values():
        for t in m["tasks"].values():
            del t["examples"]
    (tmp_path / "examples.parquet").write_bytes(b"stale")
    (tmp_path / "examples.jsonl").write_text("{}\n")
    files = write_outputs(tmp_path, summary, [], report=False)
    assert "examples" not in files and not list(tmp_path.glob("examples.*"))
    assert example_rows(summary) == []
