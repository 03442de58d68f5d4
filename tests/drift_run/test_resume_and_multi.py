"""Resume after Ctrl-C or SIGKILL gives the uninterrupted outputs; several tuned models and datasets in one run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from analysis_helpers import write_records
from test_drift import _assert_same

from driftscope import drift
from driftscope.drift_run import run as run_mod
from driftscope.engine.runner import LockstepRunner

OPTS = {"progress": False, "max_batch_tokens": 64, "checkpoint_every": 0}


def _models_block(summary):
    return json.loads(json.dumps(summary["models"]))


def test_resume_after_keyboard_interrupt(models, records, tmp_path, monkeypatch):
    full = drift(models["base"], models["tuned"], records, tmp_path / "full", **OPTS).summary
    calls = {"n": 0}
    original = run_mod._Run.process

    def flaky(self, k, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, k, batch)

    monkeypatch.setattr(run_mod._Run, "process", flaky)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], models["tuned"], records, out, **OPTS)
    assert (out / ".driftscope-state" / "progress.json").is_file()
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(run_mod._Run, "process", original)
    resumed_calls = {"n": 0}

    def counting(self, k, batch):
        resumed_calls["n"] += 1
        return original(self, k, batch)

    monkeypatch.setattr(run_mod._Run, "process", counting)
    resumed = drift(models["base"], models["tuned"], records, out, resume=True, **OPTS).summary
    assert resumed_calls["n"] > 0, "the resumed run must process the batches left"
    # batches 1-2 were checkpointed before the interrupt in batch 3: the resumed run redoes only batch 3 on
    total = calls["n"] - 1 + resumed_calls["n"]
    uninterrupted = {"n": 0}

    def count_only(self, k, batch):
        uninterrupted["n"] += 1
        return original(self, k, batch)

    monkeypatch.setattr(run_mod._Run, "process", count_only)
    drift(models["base"], models["tuned"], records, None, **OPTS)
    assert total == uninterrupted["n"], f"{calls['n'] - 1} + {resumed_calls['n']} batches vs {uninterrupted['n']}"
    _assert_same(_models_block(full), _models_block(resumed), rel=0)
    assert json.loads((out / "summary.json").read_text())["models"] == resumed["models"]
    assert not (out / ".driftscope-state").exists()


def test_resume_refuses_changed_inputs(models, records, tmp_path, monkeypatch):
    def boom(self, k, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod._Run, "process", boom)
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], models["tuned"], records, tmp_path, **OPTS)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="options differ"):
        drift(models["base"], models["tuned"], records, tmp_path, resume=True, **{**OPTS, "max_batch_tokens": 65})


def test_resume_after_sigkill(models, tmp_path):
    data = tmp_path / "big.jsonl"
    rows = (write_records(tmp_path / "one.jsonl").read_text()) * 8
    data.write_text(rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "driftscope.cli", "drift", "--base", str(models["base"]), "--tuned",
           str(models["tuned"]), "--data", str(data), "--out", str(out), "--max-batch-tokens", "48",
           "--checkpoint-every", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = out / ".driftscope-state" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["done"].get("big", 0) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["done"]["big"]
    assert not (out / "summary.json").exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = drift(models["base"], models["tuned"], data, tmp_path / "full", **{**OPTS, "max_batch_tokens": 48}).summary
    got = json.loads((out / "summary.json").read_text())
    assert done >= 3
    _assert_same(_models_block(full), _models_block(got), rel=0)


def test_several_tuned_models_and_datasets_share_the_base_forward(models, records, tmp_path, monkeypatch):
    second = write_records(tmp_path / "short.jsonl", n=6)
    forwards = {"n": 0}
    original = LockstepRunner.forward

    def counting(self, *a, **kw):
        forwards["n"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(LockstepRunner, "forward", counting)
    both = drift(models["base"], [models["tuned"], models["late"]], [records, second], **OPTS).summary
    n_both = forwards["n"]
    forwards["n"] = 0
    singles = {}
    for name in ("tuned", "late"):
        singles[name] = drift(models["base"], models[name], [records, second], **OPTS).summary["models"][name]
    assert n_both == forwards["n"] // 2, "the base forward must run once per batch, not once per tuned model"
    assert set(both["models"]) == {"tuned", "late"}
    for name in ("tuned", "late"):
        assert set(both["models"][name]["tasks"]) == {"mixed", "short"}
        _assert_same(json.loads(json.dumps(singles[name])), json.loads(json.dumps(both["models"][name])), rel=1e-6)


def test_several_tuned_models_share_one_vocab_probe_call_per_batch(models, records, monkeypatch):
    calls = {"pairs": [], "forwards": 0}
    probe, forward = run_mod.vocab_probe, LockstepRunner.forward

    def counting_probe(h_base, w_base, h_tuned, w_tuned, *a, **kw):
        calls["pairs"].append(len(h_tuned) if isinstance(h_tuned, list) else 1)
        return probe(h_base, w_base, h_tuned, w_tuned, *a, **kw)

    def counting_forward(self, *a, **kw):
        calls["forwards"] += 1
        return forward(self, *a, **kw)

    monkeypatch.setattr(run_mod, "vocab_probe", counting_probe)
    monkeypatch.setattr(LockstepRunner, "forward", counting_forward)
    both = drift(models["base"], [models["tuned"], models["late"]], records, **OPTS).summary
    assert calls["pairs"] == [2] * calls["forwards"], "one vocab_probe call per batch, with both tuned heads"
    monkeypatch.setattr(run_mod, "vocab_probe", probe)
    for name in ("tuned", "late"):  # the shared call gives each model exactly its single-pair numbers
        alone = drift(models["base"], models[name], records, **OPTS).summary["models"][name]
        _assert_same(json.loads(json.dumps(alone)), json.loads(json.dumps(both["models"][name])), rel=0)
    stages = both["timing"]["stages"]
    assert {"plan", "load", "forward", "layer_probes", "vocab_probe", "token_probes"} <= set(stages)
    assert all(v >= 0 for v in stages.values())
