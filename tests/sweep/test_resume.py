"""A sweep resumes per checkpoint: killed (SIGKILL mid-pass, or between a pass's entries) and rerun it ends with the
same numbers; a finished sweep plus new checkpoints computes only those; changed options or checkpoints are refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import differences, fast_reports, manifest, write_records, write_run, write_step

import driftscope
from driftscope.sweep_run import run as R
from driftscope.sweep_run.state import SweepState

_CHILD = """import sys
from pathlib import Path
import driftscope.report, driftscope.sweep_run.report
driftscope.report.write_report = lambda out, summary: Path(out) / "report.html"
driftscope.sweep_run.report.write_report = lambda result, out: {}
from driftscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    run = write_run(tmp_path_factory.mktemp("resume-run"))
    write_records(run["data"][0], n=48)  # passes long enough to be killed in
    return run


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory) -> dict:
    """The uninterrupted sweep in groups of 2 (3 passes)."""
    with pytest.MonkeyPatch.context() as mp:
        fast_reports(mp)
        return driftscope.sweep(manifest(run, run["root"] / "ref.json", max_group=2),
                                tmp_path_factory.mktemp("reference")).sweep


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    fast_reports(monkeypatch)


def _numbers(sweep: dict) -> list:
    """What must not depend on interruptions: every checkpoint's entry and the passes' labels."""
    return [sweep["checkpoints"], [(p["id"], p["labels"]) for p in sweep["passes"]]]


def _calls(monkeypatch) -> list[tuple[list[str], bool]]:
    calls = []
    original = R.drift

    def counting(base, tuned, data, out=None, **kw):
        calls.append(([Path(t).name for t in tuned], kw["resume"]))
        return original(base, tuned, data, out, **kw)

    monkeypatch.setattr(R, "drift", counting)
    return calls


def test_sigkill_mid_pass_then_rerun_gives_the_same_numbers(run, reference, tmp_path, monkeypatch):
    m = manifest(run, run["root"] / "kill.json", max_group=2, checkpoint_every=0)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, "sweep", str(m), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, second = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        if second is None and (out / "sweep-state.json").is_file():
            second = out / "passes" / json.loads((out / "sweep-state.json").read_text())["passes"][1]["id"]
        progress = second / ".driftscope-state" / "progress.json" if second else None
        if progress and progress.is_file() and json.loads(progress.read_text())["done"].get("a", 0) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.stderr.read().decode()[-800:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "sweep.json").exists()
    assert sorted(p.stem for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    calls = _calls(monkeypatch)
    rep = driftscope.sweep(m, out)
    assert calls == [(["checkpoint-30", "checkpoint-40"], True), (["checkpoint-50"], False)]  # the 2nd pass resumed
    assert rep.computed == ["checkpoint-30", "checkpoint-40", "checkpoint-50"]
    assert not differences(_numbers(reference), _numbers(rep.sweep))


def test_crash_between_a_pass_entries_then_rerun(run, reference, tmp_path, monkeypatch):
    m = manifest(run, run["root"] / "crash.json", max_group=2)
    original, written = SweepState.put_entry, []

    def crash_after_one(self, label, entry):
        if len(written) == 3:  # pass 1 done, the first entry of pass 2 written
            raise KeyboardInterrupt
        written.append(label)
        original(self, label, entry)

    monkeypatch.setattr(SweepState, "put_entry", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        driftscope.sweep(m, tmp_path)
    monkeypatch.setattr(SweepState, "put_entry", original)
    calls = _calls(monkeypatch)
    rep = driftscope.sweep(m, tmp_path)
    assert calls == [(["checkpoint-30", "checkpoint-40"], False), (["checkpoint-50"], False)]
    assert not differences(_numbers(reference), _numbers(rep.sweep))


def test_two_new_checkpoints_compute_only_those(run, reference, tmp_path, monkeypatch):
    items = [{"path": str(c), "label": c.name, "step": int(c.name.split("-")[1])} for c in run["checkpoints"]]
    first = driftscope.sweep(manifest(run, run["root"] / "three.json", checkpoints=items[:3], max_group=2), tmp_path)
    assert first.sweep["timing"]["base_passes"] == 2
    calls = _calls(monkeypatch)
    rep = driftscope.sweep(manifest(run, run["root"] / "five.json", checkpoints=items, max_group=2), tmp_path)
    assert calls == [(["checkpoint-40", "checkpoint-50"], False)]
    assert rep.computed == ["checkpoint-40", "checkpoint-50"] and rep.sweep["timing"]["computed_now"] == 2
    old = [(p["id"], p["labels"]) for p in first.sweep["passes"]]
    assert [(p["id"], p["labels"]) for p in rep.sweep["passes"]][:2] == old  # pass ids stay what they were
    for a, b in zip(reference["checkpoints"], rep.sweep["checkpoints"]):  # other groups, the same numbers
        assert a["label"] == b["label"] and not differences(a["tasks"], b["tasks"]), a["label"]
    calls.clear()
    again = driftscope.sweep(manifest(run, run["root"] / "five.json", checkpoints=items, max_group=2,
                                      checkpoint_every=5.0), tmp_path)  # a cosmetic option may change
    assert calls == [] and again.computed == [] and again.sweep["timing"]["base_passes"] == 3
    fewer = driftscope.sweep(manifest(run, run["root"] / "four.json", checkpoints=items[:3] + items[4:], max_group=2),
                             tmp_path)  # a finished checkpoint left out: its pass stays, with its summary
    assert calls == [] and [r["label"] for r in fewer.sweep["checkpoints"]] == [x["label"] for x in items if
                                                                               x["step"] != 40]
    assert [p["labels"] for p in fewer.sweep["passes"]] == [p["labels"] for p in again.sweep["passes"]]
    assert all((tmp_path / p["summary"]).is_file() for p in fewer.sweep["passes"])


def test_changed_option_or_checkpoint_is_refused_naming_it(run, tmp_path, monkeypatch):
    items = [{"path": str(c), "label": c.name, "step": i} for i, c in enumerate(run["checkpoints"][:2])]
    driftscope.sweep(manifest(run, run["root"] / "opt.json", checkpoints=items), tmp_path / "out")
    calls = _calls(monkeypatch)
    with pytest.raises(ValueError, match=r"other inputs or options \(options.max_batch_tokens: saved 64, now 65\)"):
        driftscope.sweep(manifest(run, run["root"] / "opt.json", checkpoints=items, max_batch_tokens=65),
                         tmp_path / "out")
    changed = write_step(run["base"], run["state"], tmp_path / "changed", 0.9)
    items[1]["path"] = str(changed)
    with pytest.raises(ValueError, match=r"checkpoint 'checkpoint-20' \(.*\) changed since .* was computed"):
        driftscope.sweep(manifest(run, run["root"] / "opt.json", checkpoints=items), tmp_path / "out")
    assert calls == []
    rep = driftscope.sweep(manifest(run, run["root"] / "opt.json", checkpoints=items), tmp_path / "out",
                           overwrite=True)
    assert calls == [(["checkpoint-10", "changed"], False)] and rep.computed == ["checkpoint-10", "checkpoint-20"]


def test_a_checkpoint_dropped_from_an_unfinished_pass_regroups_the_rest(run, reference, tmp_path, monkeypatch,
                                                                        capsys):
    items = [{"path": str(c), "label": c.name, "step": int(c.name.split("-")[1])} for c in run["checkpoints"]]
    original, n = R.drift, []

    def stop_at_second(*a, **kw):
        n.append(1)
        if len(n) == 2:
            raise KeyboardInterrupt
        return original(*a, **kw)

    monkeypatch.setattr(R, "drift", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        driftscope.sweep(manifest(run, run["root"] / "d5.json", checkpoints=items, max_group=2), tmp_path)
    monkeypatch.setattr(R, "drift", original)
    calls = _calls(monkeypatch)
    rep = driftscope.sweep(manifest(run, run["root"] / "d4.json", checkpoints=items[:3] + items[4:], max_group=2,
                                    progress=True), tmp_path)
    # the unfinished pass [50] keeps its id; [30, 40] lost 40: 30 goes to a new pass
    assert calls == [(["checkpoint-50"], False), (["checkpoint-30"], False)]
    assert [p["labels"] for p in rep.sweep["passes"]] == [["checkpoint-10", "checkpoint-20"], ["checkpoint-50"],
                                                          ["checkpoint-30"]]
    saved = json.loads((tmp_path / "sweep-state.json").read_text())["passes"]
    assert [p["labels"] for p in saved] == [p["labels"] for p in rep.sweep["passes"]]
    ref = {r["label"]: r["tasks"] for r in reference["checkpoints"]}
    for r in rep.sweep["checkpoints"]:
        assert not differences(ref[r["label"]], r["tasks"]), r["label"]
    err = capsys.readouterr().err
    assert "sweep: 1 checkpoint to compute in 1 pass (up to 2 per pass" in err
    assert "sweep: pass 1/2 (checkpoint-50); 2/4 checkpoints done" in err
    assert "sweep: pass 2/2 (checkpoint-30); 3/4 checkpoints done, eta " in err


def test_results_without_a_state_are_refused_and_overwrite_removes_only_the_sweeps_files(run, tmp_path):
    items = [{"path": str(c), "label": c.name, "step": i} for i, c in enumerate(run["checkpoints"][:2])]
    m = manifest(run, run["root"] / "left.json", checkpoints=items)
    (tmp_path / "checkpoints" / "mine").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("keep")
    driftscope.sweep(m, tmp_path)
    (tmp_path / "sweep-state.json").unlink()  # e.g. killed while an --overwrite was clearing
    with pytest.raises(ValueError, match=r"holds sweep results \(checkpoints/checkpoint-10.json, .*sweep.json\) "
                                         r"but no sweep-state.json: pass --overwrite"):
        driftscope.sweep(m, tmp_path)
    rep = driftscope.sweep(m, tmp_path, overwrite=True)
    assert rep.computed == ["checkpoint-10", "checkpoint-20"]
    assert (tmp_path / "notes.txt").read_text() == "keep" and (tmp_path / "checkpoints" / "mine").is_dir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-10.json",
                                                                            "checkpoint-20.json", "mine"]


def test_a_cut_short_pass_that_loses_a_checkpoint_reruns_its_finished_ones(run, reference, tmp_path, monkeypatch):
    items = [{"path": str(c), "label": c.name, "step": int(c.name.split("-")[1])} for c in run["checkpoints"]]
    original, written = SweepState.put_entry, []

    def crash_after_three(self, label, entry):
        if len(written) == 3:  # pass [10, 20] done, checkpoint-30's entry of pass [30, 40] written
            raise KeyboardInterrupt
        written.append(label)
        original(self, label, entry)

    monkeypatch.setattr(SweepState, "put_entry", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        driftscope.sweep(manifest(run, run["root"] / "c5.json", checkpoints=items, max_group=2), tmp_path)
    monkeypatch.setattr(SweepState, "put_entry", original)
    assert (tmp_path / "checkpoints" / "checkpoint-30.json").is_file()
    calls = _calls(monkeypatch)
    rep = driftscope.sweep(manifest(run, run["root"] / "c4.json", checkpoints=items[:3] + items[4:], max_group=2),
                           tmp_path)
    assert calls == [(["checkpoint-50"], False), (["checkpoint-30"], False)]
    ids = {p["id"] for p in rep.sweep["passes"]}
    assert all(r["pass"] in ids for r in rep.sweep["checkpoints"])
    ref = {r["label"]: r["tasks"] for r in reference["checkpoints"]}
    for r in rep.sweep["checkpoints"]:
        assert not differences(ref[r["label"]], r["tasks"]), r["label"]
