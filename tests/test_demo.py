"""`driftscope demo` end to end: the tuned model's change shows up exactly where it was put."""
import json

import pytest

from driftscope.cli import main
from driftscope.demo.run import run_demo


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), seed=0, changed_from=2)


def test_no_drift_before_the_changed_layer(summary):
    # hidden_states[i] is the output of layer i-1 (0 = embeddings): layers 0 and 1 are untouched,
    # so states 0, 1, 2 are bitwise equal; state 3 (output of layer 2) is the first to move.
    for row in summary["layers"][:3]:
        assert row["cosine"] == pytest.approx(1.0, abs=1e-12) and row["rel_l2"] == 0.0, row
    for row in summary["layers"][3:]:
        assert row["rel_l2"] > 1e-3, row


def test_kl_is_positive_and_consistent(summary):
    assert summary["kl_tb_mean"] > 0 and summary["kl_bt_mean"] > 0
    n = sum(t["tokens"] for t in summary["texts"])
    assert n == summary["tokens_scored"]
    weighted = sum(t["kl_tb"] * t["tokens"] for t in summary["texts"]) / n
    assert weighted == pytest.approx(summary["kl_tb_mean"], rel=1e-6)


def test_identical_pair_has_zero_drift(tmp_path):
    s = run_demo(tmp_path, seed=3, changed_from=99)  # no layer is changed
    assert abs(s["kl_tb_mean"]) < 1e-6 and abs(s["kl_bt_mean"]) < 1e-6
    assert s["top1_agreement"] == 1.0
    assert all(t["rank_shift"] == 0 for t in s["texts"])


def test_cli_demo_writes_summary(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path) in printed
    assert json.loads((tmp_path / "summary.json").read_text())["tokens_scored"] > 0
