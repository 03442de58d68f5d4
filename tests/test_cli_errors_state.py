"""The CLI boundary for the failures that put work at risk or would pass silently ([9]): non-finite weights, an
interrupted run, a changed or damaged resume state, a full disk. Each is one line with exit code 2, no traceback,
naming what it should; the work already done stays on disk."""
from __future__ import annotations

import errno
import json

import pytest
from safetensors.torch import load_file, save_file

from driftscope.probes import TokenMetrics
from test_cli_errors import cli_pair, _drift, _error, _variant

FAST = ("--max-batch-tokens", "16", "--checkpoint-every", "0")


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> dict:
    return cli_pair(tmp_path_factory.mktemp("cli-state"))


def _interrupted(ck, out, monkeypatch) -> None:
    """A drift run into `out` stopped by Ctrl-C in its second batch (exit 130, its state kept)."""
    original, calls = TokenMetrics.update, {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(TokenMetrics, "update", flaky)
    assert _drift(ck, *FAST, out=out) == 130
    monkeypatch.setattr(TokenMetrics, "update", original)
    assert (out / ".driftscope-state" / "progress.json").is_file()


def test_non_finite_weights_name_the_tensor_and_file(ck, tmp_path, capsys):
    bad = _variant(ck["tuned"], tmp_path / "nan")
    state = load_file(str(bad / "model.safetensors"))
    name = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    assert _drift(ck, tuned=bad, out=tmp_path / "out") == 2
    _error(capsys, "drift", str(bad / "model.safetensors"), name, "non-finite")


def test_an_interrupted_run_is_never_discarded_and_resumes(ck, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _interrupted(ck, out, monkeypatch)
    capsys.readouterr()
    progress = (out / ".driftscope-state" / "progress.json").read_bytes()
    assert _drift(ck, *FAST, out=out) == 2  # no --resume: refused, the state untouched
    _error(capsys, "drift", str(out), "interrupted run", "--resume", "--overwrite")
    assert (out / ".driftscope-state" / "progress.json").read_bytes() == progress
    assert _drift(ck, "--max-batch-tokens", "17", "--checkpoint-every", "0", "--resume", out=out) == 2
    _error(capsys, "drift", "max_batch_tokens", "16", "17")  # the differing option with both values
    assert _drift(ck, *FAST, "--resume", out=out) == 0
    assert json.loads((out / "summary.json").read_text())["models"]


def test_a_damaged_state_is_named(ck, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _interrupted(ck, out, monkeypatch)
    capsys.readouterr()
    progress = out / ".driftscope-state" / "progress.json"
    progress.write_text(progress.read_text()[:20])
    assert _drift(ck, *FAST, "--resume", out=out) == 2
    _error(capsys, "drift", str(progress), "damaged", "--overwrite")


def test_a_full_disk_keeps_the_state_and_says_how_to_continue(ck, tmp_path, capsys, monkeypatch):
    import driftscope.drift_run.outputs as outputs

    def full(path, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "_write_json", full)
    out = tmp_path / "run"
    assert _drift(ck, *FAST, out=out) == 2
    _error(capsys, "drift", "No space left on device", "--resume")
    assert (out / ".driftscope-state" / "progress.json").is_file()
    monkeypatch.undo()
    assert _drift(ck, *FAST, "--resume", out=out) == 0 and (out / "summary.json").is_file()


def test_resume_without_state_warns_and_runs(ck, tmp_path, caplog):
    assert _drift(ck, *FAST, "--resume", out=tmp_path / "new") == 0
    assert "holds no interrupted run to continue" in caplog.text


@pytest.mark.parametrize("device", ["gpu", "tpu"], ids=["device-gpu", "device-tpu"])
def test_unknown_device(ck, tmp_path, capsys, device):
    assert _drift(ck, "--device", device, out=tmp_path / "out") == 2
    _error(capsys, "drift", device)


def test_sigterm_exits_143_with_the_state_kept(ck, tmp_path, monkeypatch, capsys):
    """A scheduler's stop (SIGTERM) in the second batch: saved like Ctrl-C, one line on how to continue, exit 143
    (128 + SIGTERM) so that a job script can tell it from Ctrl-C's 130."""
    import os
    import signal

    original, calls = TokenMetrics.update, {"n": 0}

    def term(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **kw)

    monkeypatch.setattr(TokenMetrics, "update", term)
    out = tmp_path / "out"
    assert _drift(ck, *FAST, out=out) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert "--resume" in err[-1] and (out / ".driftscope-state" / "progress.json").is_file(), err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
