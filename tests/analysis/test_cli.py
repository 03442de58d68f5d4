"""`driftscope drift` on the command line: outputs, messages, and errors that name the offending input."""
from __future__ import annotations

import json

from driftscope.cli import main


def test_cli_drift_writes_every_output(models, records, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(records),
               "--out", str(out), "--no-progress", "--max-batch-tokens", "128", "--pca", "paper", "--pca-queries", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("summary.json", "pca_shift.json", "report.html"):
        assert (out / name).is_file() and str(out / name) in printed
    summary = json.loads((out / "summary.json").read_text())
    task = summary["models"]["tuned"]["tasks"]["mixed"]
    assert summary["config"]["max_batch_tokens"] == 128 and task["pca"]["mode"] == "paper"
    entries = json.loads((out / "pca_shift.json").read_text())
    assert entries[0]["benchmark"] == "mixed_PCA_Shift"
    assert {r["state"] for r in entries[0]["data"]} == {"Original", "Updated"}
    assert f"tuned / mixed: {task['tokens']} tokens" in printed
    assert not (out / ".driftscope-state").exists()


def test_cli_drift_reports_bad_lines_and_missing_files(models, tmp_path, capsys):
    data = tmp_path / "some.jsonl"
    data.write_text('{"prompt": "a b c", "response": " d e f g"}\n{"prompt": 3}\nnot json\n')
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(data),
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    problems = json.loads((tmp_path / "o" / "summary.json").read_text())["models"]["tuned"]["tasks"]["some"]["problems"]
    assert [p.split(": ")[0] for p in problems] == [f"{data}:2", f"{data}:3"], problems
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(tmp_path / "nope"), "--data", str(data),
               "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and f"checkpoint folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
