"""`driftscope demo` end to end: the tuned model's change shows up exactly where it was put."""
import json

import pytest

from driftscope.cli import main
from driftscope.demo.run import run_demo


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), seed=0, changed_from=2)


def test_no_drift_before_the_changed_layer(report):
    # state i is the output of layer i-1 (0 = embeddings): layers 0 and 1 are untouched, so states 0..2 are
    # bitwise equal; state 3 (output of layer 2) is the first to move.
    for task in report.summary["models"]["tuned"]["tasks"].values():
        for row in task["layers"][:3]:
            assert row["cosine"] == pytest.approx(1.0, abs=1e-12) and row["rel_l2"] == 0.0, row
            assert row["pca_shift"] == 0.0, row
        for row in task["layers"][3:]:
            assert row["rel_l2"] > 1e-3, row


def test_both_generated_tasks_are_scored_and_written(report):
    tasks = report.summary["models"]["tuned"]["tasks"]
    assert set(tasks) == {"math", "general"}
    for t in tasks.values():
        assert t["tokens"] > 100 and t["samples"] == 24 and t["kl_tb"]["token_mean"] > 0 and not t["problems"]
    for kind in ("summary", "tokens", "pca_shift", "report"):
        assert report.files[kind].is_file(), kind
    on_disk = json.loads(report.files["summary"].read_text())
    assert on_disk["models"] == json.loads(json.dumps(report.summary["models"]))
    assert ("data:image/png;base64," in report.files["report"].read_text()
            or "matplotlib" in report.files["report"].read_text())


def test_identical_pair_has_zero_drift(tmp_path):
    r = run_demo(tmp_path, seed=3, changed_from=99)  # no layer is changed
    for t in r.summary["models"]["tuned"]["tasks"].values():
        assert abs(t["kl_tb"]["token_mean"]) < 1e-6 and abs(t["kl_bt"]["token_mean"]) < 1e-6
        assert t["top1_agreement"] == 1.0 and t["rank_shift"]["token_mean"] == 0


def test_cli_demo_prints_where_the_report_is(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "report.html") in printed
    assert json.loads((tmp_path / "summary.json").read_text())["models"]["tuned"]["tasks"]["math"]["tokens"] > 0
