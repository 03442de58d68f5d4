"""Nothing lost, nothing silent: an interrupted run is never discarded without --overwrite, a refused resume names
what differs or what is damaged, a full disk keeps the state and says how to go on, outputs get the usual file mode,
and the progress line measures this process's work only."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import stat

import pytest
from test_drift import _assert_same

from driftscope import drift
from driftscope.drift_run import DriftOptions
from driftscope.drift_run import checkpoint as checkpoint_mod
from driftscope.drift_run import run as run_mod
from driftscope.engine import loader as loader_mod
from driftscope.telemetry import Progress
from driftscope.errors import InputError
from driftscope.util import atomic_write

OPTS = {"progress": False, "max_batch_tokens": 64, "checkpoint_every": 0}


@pytest.fixture
def no_html(monkeypatch):
    import driftscope.report

    monkeypatch.setattr(driftscope.report, "write_report", lambda out, summary: out / "report.html")


@pytest.fixture(scope="module")
def full(models, records):
    return json.loads(json.dumps(drift(models["base"], models["tuned"], records, **OPTS).summary["models"]))


def _interrupt(models, records, out, monkeypatch, at: int = 3, **opts):
    """Run into `out`, interrupted by Ctrl-C in batch `at` (batches before it are checkpointed)."""
    original, calls = run_mod._Run.process, {"n": 0}

    def flaky(self, k, batch):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return original(self, k, batch)

    monkeypatch.setattr(run_mod._Run, "process", flaky)
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], models["tuned"], records, out, **{**OPTS, **opts})
    monkeypatch.setattr(run_mod._Run, "process", original)
    return out / ".driftscope-state"


def _no_batches(monkeypatch):
    monkeypatch.setattr(run_mod._Run, "process", lambda self, k, b: pytest.fail("a batch was processed again"))


# ---- an interrupted run is never discarded silently -----------------------------------------------------------------
def test_a_rerun_without_resume_refuses_to_discard_an_interrupted_run(models, records, tmp_path, monkeypatch, full,
                                                                      no_html):
    state = _interrupt(models, records, tmp_path, monkeypatch)
    saved = {f.name: f.read_bytes() for f in state.iterdir()}
    monkeypatch.setattr(loader_mod, "load_model", lambda *a, **kw: pytest.fail("weights loaded before the refusal"))
    with pytest.raises(InputError) as exc:
        drift(models["base"], models["tuned"], records, tmp_path, **OPTS)
    msg = str(exc.value)
    assert f"{tmp_path} holds an interrupted run (2 batches of mixed done, saved " in msg, msg
    assert "--resume to continue it, or --overwrite to discard it" in msg, msg
    assert {f.name: f.read_bytes() for f in state.iterdir()} == saved, "the refusal touched the state"
    with pytest.raises(InputError, match="--resume and --overwrite exclude each other"):
        drift(models["base"], models["tuned"], records, tmp_path, resume=True, overwrite=True, **OPTS)
    monkeypatch.undo()
    summary = drift(models["base"], models["tuned"], records, tmp_path, overwrite=True, **OPTS).summary
    _assert_same(full, json.loads(json.dumps(summary["models"])), rel=0)
    assert not state.exists() and (tmp_path / "summary.json").is_file()


def test_resume_without_a_state_warns_then_runs(models, records, tmp_path, caplog, no_html):
    with caplog.at_level(logging.WARNING):
        drift(models["base"], models["tuned"], records, tmp_path, resume=True, **{**OPTS, "checkpoint_every": 3600})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"--resume: {tmp_path} holds no interrupted run to continue; starting a fresh run"], warned
    assert (tmp_path / "summary.json").is_file()


def test_sigterm_saves_the_progress_like_ctrl_c(models, records, tmp_path, monkeypatch, full, no_html):
    real, calls = checkpoint_mod.Checkpointer.maybe_save, {"n": 0}

    def term_after_third(self, progress, **kw):  # between two batches: what a scheduler's stop would hit most often
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, progress, **kw)

    monkeypatch.setattr(checkpoint_mod.Checkpointer, "maybe_save", term_after_third)
    opts = {**OPTS, "checkpoint_every": 3600}  # no checkpoint of its own: only the SIGTERM's save writes progress
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], models["tuned"], records, tmp_path, **opts)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler outlived the run"
    assert json.loads((tmp_path / ".driftscope-state" / "progress.json").read_text())["done"] == {"mixed": 3}
    monkeypatch.undo()
    summary = drift(models["base"], models["tuned"], records, tmp_path, resume=True, **opts).summary
    _assert_same(full, json.loads(json.dumps(summary["models"])), rel=0)


# ---- a refused resume says what differs, or which file is damaged ---------------------------------------------------
def test_a_refused_resume_names_each_difference_with_both_values(models, records, tmp_path, monkeypatch):
    _interrupt(models, records, tmp_path / "out", monkeypatch)
    changed = tmp_path / "mixed.jsonl"  # the same name (the same task), other contents
    changed.write_text(records.read_text().replace("museum", "library"))
    with pytest.raises(InputError) as exc:
        drift(models["base"], models["tuned"], changed, tmp_path / "out", resume=True,
              **{**OPTS, "max_batch_tokens": 65, "pca": "none"})
    msg = str(exc.value)
    assert "the run's data, options differ from the interrupted run's" in msg, msg
    assert f'data.mixed.path: saved "{records.resolve()}", now "{changed.resolve()}"' in msg, msg
    assert "options.max_batch_tokens: saved 64, now 65" in msg and 'options.pca: saved "streaming", now "none"' in msg
    assert "data.mixed.sha256: saved sha256 " in msg and "--overwrite to start over" in msg, msg


@pytest.mark.parametrize("damage", ["progress-truncated", "progress-not-an-object", "tensors-truncated",
                                    "tensors-wrong-keys"])
def test_a_damaged_state_is_named_with_what_to_do(models, records, tmp_path, monkeypatch, damage):
    state = _interrupt(models, records, tmp_path, monkeypatch)
    progress = state / "progress.json"
    tensors = next(state.glob("t0.*.safetensors"))
    if damage == "progress-truncated":
        progress.write_bytes(progress.read_bytes()[:40])
    elif damage == "progress-not-an-object":
        progress.write_text(json.dumps({**json.loads(progress.read_text()), "done": [2]}))
    elif damage == "tensors-truncated":
        tensors.write_bytes(tensors.read_bytes()[:100])
    else:
        from safetensors.torch import load_file, save_file

        save_file({f"x.{k}": v for k, v in load_file(str(tensors)).items()}, str(tensors))
    with pytest.raises(InputError) as exc:
        drift(models["base"], models["tuned"], records, tmp_path, resume=True, **OPTS)
    msg = str(exc.value)
    damaged = progress if damage.startswith("progress") else tensors
    assert msg.startswith(f"cannot resume: {damaged} is damaged (") and "\n" not in msg, msg
    assert msg.endswith("pass --overwrite to discard the interrupted run and start over"), msg


# ---- a full disk or a read-only folder keeps the state and says how to go on ---------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES], ids=["ENOSPC", "EROFS", "EACCES"])
def test_a_failed_output_write_keeps_the_finished_run(models, records, tmp_path, monkeypatch, full, code):
    import driftscope.report

    def full_disk(out, summary):
        raise OSError(code, os.strerror(code), str(out / "report.html"))

    monkeypatch.setattr(driftscope.report, "write_report", full_disk)
    opts = {**OPTS, "checkpoint_every": 3600}  # no checkpoint during the run: the finished state is saved at its end
    with pytest.raises(InputError) as exc:
        drift(models["base"], models["tuned"], records, tmp_path, **opts)
    msg = str(exc.value)
    assert msg.startswith(f"cannot write output {tmp_path / 'report.html'} ({os.strerror(code)}); ") and "\n" not in msg
    assert "then rerun with --resume to write the outputs" in msg, msg
    progress = json.loads((tmp_path / ".driftscope-state" / "progress.json").read_text())
    batches = len(run_mod.plan(models["base"], models["tuned"], records, DriftOptions(**opts)).tasks[0])
    assert progress["done"] == {"mixed": batches}, (progress["done"], batches)
    monkeypatch.setattr(driftscope.report, "write_report", lambda out, summary: out / "report.html")
    _no_batches(monkeypatch)
    summary = drift(models["base"], models["tuned"], records, tmp_path, resume=True, **opts).summary
    _assert_same(full, json.loads(json.dumps(summary["models"])), rel=0)
    assert not (tmp_path / ".driftscope-state").exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError], ids=["interrupt", "error"])
@pytest.mark.parametrize("where", ["summary", "outputs"])
def test_a_failure_past_the_loop_keeps_the_finished_run(models, records, tmp_path, monkeypatch, full, failure, where):
    """The finished run's state is written on the way out of a failed summary or output write (not before: a
    successful run does not write a state it then deletes), and --resume only writes the outputs."""
    import driftscope.report

    def fails(*args, **kwargs):
        raise failure("injected")

    if where == "summary":
        monkeypatch.setattr(run_mod._Run, "summarize", fails)
    else:
        monkeypatch.setattr(driftscope.report, "write_report", fails)
    opts = {**OPTS, "checkpoint_every": 3600}  # no checkpoint during the run
    with pytest.raises(failure):
        drift(models["base"], models["tuned"], records, tmp_path, **opts)
    progress = json.loads((tmp_path / ".driftscope-state" / "progress.json").read_text())
    batches = len(run_mod.plan(models["base"], models["tuned"], records, DriftOptions(**opts)).tasks[0])
    assert progress["done"] == {"mixed": batches}, (progress["done"], batches)
    monkeypatch.undo()
    monkeypatch.setattr(driftscope.report, "write_report", lambda out, summary: out / "report.html")
    _no_batches(monkeypatch)
    summary = drift(models["base"], models["tuned"], records, tmp_path, resume=True, **opts).summary
    _assert_same(full, json.loads(json.dumps(summary["models"])), rel=0)


@pytest.mark.parametrize("every", [3600, 0])
def test_a_successful_run_saves_no_state_after_its_last_batch(models, records, tmp_path, monkeypatch, no_html, every):
    """checkpoint_every=0 saves after every batch but the last (the finished run's state is written only if its
    summary or outputs fail); a run shorter than checkpoint_every saves none."""
    saved, opts = [], {**OPTS, "checkpoint_every": every}
    monkeypatch.setattr(checkpoint_mod, "save_file", lambda tensors, path: saved.append(path))
    report = drift(models["base"], models["tuned"], records, tmp_path, **opts)
    batches = len(run_mod.plan(models["base"], models["tuned"], records, DriftOptions(**opts)).tasks[0])
    assert batches > 2 and len(saved) == (0 if every else batches - 1), (len(saved), batches)
    assert report.files["summary"].is_file() and not (tmp_path / ".driftscope-state").exists()
    from driftscope.kernels import scratch

    assert scratch._buffers == {}  # the forward's reused intermediates are not kept after the run


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(models, records, tmp_path, monkeypatch, full,
                                                                   no_html):
    real, calls = checkpoint_mod.save_file, {"n": 0}

    def fills_up(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint (after batch 3) finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path)

    monkeypatch.setattr(checkpoint_mod, "save_file", fills_up)
    with pytest.raises(InputError) as exc:
        drift(models["base"], models["tuned"], records, tmp_path, **OPTS)
    msg = str(exc.value)
    assert msg.startswith(f"cannot write the resumable state {tmp_path / '.driftscope-state' / 't0.3.safetensors'} "
                          "(No space left on device); the last checkpoint is intact"), msg
    assert msg.endswith("then rerun with --resume"), msg
    assert [f.name for f in (tmp_path / ".driftscope-state").iterdir() if not f.name.endswith(".json")] == \
        ["t0.2.safetensors"]
    monkeypatch.undo()
    summary = drift(models["base"], models["tuned"], records, tmp_path, resume=True, **OPTS).summary
    _assert_same(full, json.loads(json.dumps(summary["models"])), rel=0)


# ---- outputs get the mode of a normally created file ---------------------------------------------------------------
def test_every_output_has_the_mode_the_umask_gives(models, records, tmp_path):
    old = os.umask(0o027)
    try:
        report = drift(models["base"], models["tuned"], records, tmp_path / "out", **{**OPTS, "checkpoint_every": 3600})
        made = atomic_write(tmp_path / "private", lambda p: (p.unlink(), os.close(os.open(p, os.O_CREAT, 0o600))))
    finally:
        os.umask(old)
    modes = {kind: oct(stat.S_IMODE(path.stat().st_mode)) for kind, path in report.files.items()}
    assert set(modes) >= {"summary", "tokens", "report"} and set(modes.values()) == {"0o640"}, modes
    assert oct(stat.S_IMODE(made.stat().st_mode)) == "0o640", "a writer's own 0600 file keeps 0600"


# ---- progress: loading has its own line; rates and ETAs count this process's work only -----------------------------
def test_progress_measures_this_process_only(monkeypatch, capsys):
    now = {"t": 100.0}
    monkeypatch.setattr("driftscope.telemetry.time.perf_counter", lambda: now["t"])
    bar = Progress(1000, "drift", done=600)  # 600 tokens done by the interrupted run
    assert capsys.readouterr().err == "", "nothing is drawn before this process's first unit"
    assert bar.line().endswith("600/1000 tok (600 tok resumed), eta -- ")
    now["t"] += 2.0
    bar.advance(100)
    line = capsys.readouterr().err
    assert "700/1000 tok (600 tok resumed), 50 tok/s, eta 6 s" in line, line


def test_a_drift_run_says_it_is_loading_and_never_shows_an_infinite_eta(models, records, tmp_path, monkeypatch,
                                                                        capsys, no_html):
    _interrupt(models, records, tmp_path, monkeypatch)
    capsys.readouterr()
    drift(models["base"], models["tuned"], records, tmp_path, resume=True, **{**OPTS, "progress": True})
    err = capsys.readouterr().err
    assert err.startswith("loading base + 1 tuned model (float32 on cpu) ...\n"), err[:200]
    rates = [float(r.replace(",", "")) for r in re.findall(r"([\d,.]+) tok/s", err)]
    resumed = {int(n) for n in re.findall(r"\((\d+) tok resumed\)", err)}
    total = int(re.findall(r"/(\d+) tok", err)[-1])
    assert "eta inf" not in err and len(resumed) == 1 and 0 < resumed.pop() < total, err
    assert rates and max(rates) < 1e5, f"rates counted the resumed tokens: {rates}"  # a tiny CPU model, not 6e10


def test_a_run_keeps_no_reference_buffers_after_it_ends(models, records, full):
    """The torch backend reuses its CPU logit buffers from batch to batch; the run frees them when it ends."""
    from driftscope.kernels import use_backend
    from driftscope.kernels.vocab_probe import reference

    with use_backend("torch"):
        summary = drift(models["base"], models["tuned"], records, **OPTS).summary
    assert not reference._workspace._free
    _assert_same(full, json.loads(json.dumps(summary["models"])), rel=1e-5)  # the fp32 reference, not bit for bit
