"""Sweep manifests: the forms that are read (list, glob, folder of checkpoint-* dirs, JSON and YAML) and every bad one
refused in one line naming the manifest and the key or value, before any weights load."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from sweep_helpers import TEXTS, manifest, write_run

from driftscope.cli import main
from driftscope.engine import checkpoint as engine_checkpoint
from driftscope.engine import loader
from driftscope.sweep_run import read_manifest
from driftscope.testing import write_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    run = write_run(tmp_path_factory.mktemp("manifest-run"))
    other = shutil.copytree(run["checkpoints"][0], run["root"] / "other-tokenizer")
    write_tokenizer(other, [t.upper() for t in TEXTS], vocab_size=300)  # another vocabulary, same size
    run["other"] = other
    return run


@pytest.fixture(autouse=True)
def _no_weights(monkeypatch):
    """Any weight load fails the test: a manifest is checked with configs, tokenizers and headers only."""
    def boom(*a, **kw):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loader, "load_model", boom)
    monkeypatch.setattr(engine_checkpoint.Checkpoint, "load", boom)


def _body(run: dict, path: Path) -> dict:
    return json.loads(manifest(run, path).read_text())


BAD = {  # case -> (change to the manifest dict, expected part of the message)
    "missing-data": (lambda m: m.pop("data"), 'missing key "data"'),
    "missing-base": (lambda m: m.pop("base"), 'missing key "base"'),
    "unknown-field": (lambda m: m.update(max_batch_token=64), '"max_batch_token": did you mean "max_batch_tokens"?'),
    "unknown-far": (lambda m: m.update(zzz=1), 'unknown field "zzz": expected one of base, checkpoints'),
    "resume": (lambda m: m.update(resume=True), '"resume" is not a manifest key'),
    "duplicate-label": (lambda m: m["checkpoints"][3].update(label="checkpoint-10"), "duplicate label 'checkpoint-10'"),
    "same-path": (lambda m: m["checkpoints"][1].update(path=m["checkpoints"][0]["path"]), "is listed twice"),
    "missing-checkpoint": (lambda m: m["checkpoints"][2].update(path="run/checkpoint-999"),
                           "checkpoint-999: no such file or folder"),
    "other-tokenizer": (lambda m: m["checkpoints"].append({"path": "other-tokenizer", "label": "x", "step": 60}),
                        "the tokenizers of"),
    "bad-option": (lambda m: m.update(max_batch_tokens=0), "max_batch_tokens"),
    "bad-choice": (lambda m: m.update(pca="fast"), "pca"),
    "entry-key": (lambda m: m["checkpoints"][0].update(stpe=3), 'unknown key "stpe": did you mean "step"?'),
    "ordinal-value": (lambda m: m["checkpoints"][0].update(step="ten"), "checkpoints[0].step = 'ten' is not a number"),
    "label-as-path": (lambda m: m["checkpoints"][0].update(label="../x"), "label '../x' is not usable"),
    "glob-nothing": (lambda m: m.update(checkpoints="run/ckpt-*"), "matches no checkpoint"),
    "max-group": (lambda m: m.update(max_group=0), '"max_group" = 0 must be an integer >= 1'),
    "eval-label": (lambda m: m.update(eval={"scores": {"base": "a.json", "chekpoint-10": "b.json"}}),
                   "no checkpoint has that label"),
    "data-missing-file": (lambda m: m.update(data=["data/none.jsonl"]), "data[0]: records file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifest_is_one_line_naming_it(run, case):
    change, expected = BAD[case]
    path = run["root"] / f"bad-{case}.json"
    body = _body(run, path)
    change(body)
    path.write_text(json.dumps(body))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        read_manifest(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert expected in msg, msg


def test_bad_manifest_on_the_command_line(run, tmp_path, capsys):
    path = run["root"] / "cli-bad.json"
    body = _body(run, path)
    body["max_batch_token"] = 64
    path.write_text(json.dumps(body))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'driftscope sweep: error: {path}: unknown field "max_batch_token": did you mean '
                   '"max_batch_tokens"?'], err
    assert not (tmp_path / "out").exists()


def test_invalid_json_names_line_and_column(run):
    path = run["root"] / "broken.json"
    path.write_text('{"base": "base",\n "data": [}')
    with pytest.raises(ValueError, match=r"broken.json:2:11: not valid JSON"):
        read_manifest(path)


def test_yaml_manifest_reads_like_json(run):
    yaml = pytest.importorskip("yaml")
    body = _body(run, run["root"] / "y.json")
    (run["root"] / "m.yaml").write_text(yaml.safe_dump(body))
    a, b = read_manifest(run["root"] / "m.yaml"), read_manifest(run["root"] / "y.json")
    assert a.checkpoints == b.checkpoints and a.options == b.options and a.base == b.base and a.data == b.data


def test_yaml_without_pyyaml_is_one_line(run, monkeypatch):
    (run["root"] / "n.yaml").write_text("base: base\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ValueError, match=r"n.yaml: a YAML manifest needs PyYAML: pip install pyyaml"):
        read_manifest(run["root"] / "n.yaml")


def test_glob_and_folder_give_labels_and_steps_in_numeric_order(run, tmp_path):
    for step in (9, 100, 10):
        shutil.copytree(run["checkpoints"][0], tmp_path / "train" / f"checkpoint-{step}")
    shutil.copytree(run["base"], tmp_path / "base")
    shutil.copytree(run["root"] / "data", tmp_path / "data")
    expected = [("checkpoint-9", 9), ("checkpoint-10", 10), ("checkpoint-100", 100)]
    for form in ("train/checkpoint-*", "train"):
        path = tmp_path / "m.json"
        path.write_text(json.dumps({"base": "base", "checkpoints": form, "data": ["data/a.jsonl"]}))
        m = read_manifest(path)
        assert [(e.label, e.ordinal) for e in m.checkpoints] == expected, form
        assert [e.path for e in m.checkpoints] == [tmp_path / "train" / x for x, _ in expected]


def test_list_entries_default_label_and_ordinal(run):
    path = run["root"] / "defaults.json"
    body = _body(run, path)
    body["checkpoints"] = ["run/checkpoint-20", {"path": "run/checkpoint-30", "label": "late"}]
    body.update(ordinal="epoch", max_group=3, cka="none")
    path.write_text(json.dumps(body))
    m = read_manifest(path)
    assert [(e.label, e.ordinal) for e in m.checkpoints] == [("checkpoint-20", None), ("late", None)]
    assert m.ordinal == "epoch" and m.max_group == 3 and m.options["cka"] == "none"
    assert m.checkpoints[0].path == run["root"] / "run/checkpoint-20"  # relative to the manifest's folder
