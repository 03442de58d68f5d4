"""`driftscope ti` end to end on DESIGN §3's four models from three score-file layouts: the printed Table 1,
ti.json, ti.png, ti.html; σ options; one-line errors with exit status 2; no matplotlib → HTML without the PNG."""
from __future__ import annotations

import json

import pytest

from driftscope.cli import main
from driftscope.report import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLE_ORDER = ("aime24", "aime25", "math500", "olympiadbench", "gpqa_diamond", "livecodebench", "acpbench", "headqa",
               "coqa", "mctaco", "ifeval", "halueval")
TABLE = {  # DESIGN §3 (paper Table 1)
    "base":        "13.0  9.3 60.4 27.9 42.6 29.7 10.7 37.6 10.0 67.7 69.2 35.7",
    "sft-think":   "52.0 37.0 85.0 25.0 55.9 21.9 68.6 34.8  1.7 38.2 42.3  2.3",
    "sft-nothink": "16.0 13.0 77.2 22.7 48.7 23.5 69.3 35.0  5.3 66.1 41.4  3.3",
    "rl":          "55.7 38.0 87.8 33.8 57.7 40.6 65.4 40.2 28.2 74.0 70.0 40.7",
}
SCORES = {name: dict(zip(TABLE_ORDER, map(float, row.split()))) for name, row in TABLE.items()}
RELATIVE = {"sft-think": (85.7, -41.2), "sft-nothink": (741.5, -250.3), "rl": (83.9, 29.3)}
PAPER = {"sft-think": (52.2, -104.1), "sft-nothink": (165.4, -278.9), "rl": (82.3, 52.2)}
LM_EVAL_TASKS = {"aime24": "aime24", "aime25": "aime25", "math500": "hendrycks_math500",
                 "olympiadbench": "olympiadbench", "gpqa_diamond": "gpqa_diamond_cot_zeroshot",
                 "livecodebench": "livecodebench", "headqa": "headqa_en", "coqa": "coqa", "mctaco": "mc_taco",
                 "ifeval": "ifeval", "halueval": "halueval"}
LM_EVAL_METRIC = {"gpqa_diamond": "exact_match,flexible-extract", "headqa": "acc,none", "coqa": "em,none",
                  "mctaco": "acc,none", "ifeval": "inst_level_strict_acc,none", "halueval": "acc,none",
                  "livecodebench": "pass@1,none"}


@pytest.fixture()
def files(tmp_path):
    """base: plain JSON; sft-think: driftscope scores.json; sft-nothink: plain with display-style names;
    rl: lm-eval results (fractions, ACPBench as two mcq subtasks averaging to 65.4)."""
    out = {}
    out["base"] = tmp_path / "base.json"
    out["base"].write_text(json.dumps(SCORES["base"]))
    out["sft-think"] = tmp_path / "think_scores.json"
    out["sft-think"].write_text(json.dumps({"model": "sft-think", "scores": SCORES["sft-think"], "details": {}}))
    out["sft-nothink"] = tmp_path / "nothink.json"
    names = {"gpqa_diamond": "GPQA-Diamond", "mctaco": "MC-TACO", "olympiadbench": "OlympiadBench"}
    out["sft-nothink"].write_text(json.dumps({names.get(k, k): v for k, v in SCORES["sft-nothink"].items()}))
    results = {}
    for bench, task in LM_EVAL_TASKS.items():
        key = LM_EVAL_METRIC.get(bench, "exact_match,none")
        results[task] = {"alias": task, key: SCORES["rl"][bench] / 100, key.replace(",", "_stderr,", 1): 0.01}
    acp = SCORES["rl"]["acpbench"] / 100
    results["acp_app_mcq"] = {"exact_match,mcq-extract": acp - 0.05}
    results["acp_prog_mcq"] = {"exact_match,mcq-extract": acp + 0.05}
    out["rl"] = tmp_path / "results_rl.json"
    out["rl"].write_text(json.dumps({"results": results, "group_subtasks": {}, "configs": {}}))
    return out


def _tuned_args(files) -> list[str]:
    return [a for n in ("sft-think", "sft-nothink", "rl") for a in ("--tuned", f"{n}={files[n]}")]


def test_relative_three_models_writes_all_files(files, tmp_path, capsys):
    out = tmp_path / "ti-out"
    rc = main(["ti", "--base", f"Qwen3-14B-Base={files['base']}", *_tuned_args(files), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = {line.split("|")[0].strip(): line for line in captured.out.splitlines() if "|" in line}
    for name, (ti_other, ti_non) in RELATIVE.items():
        assert rows[name].split("|")[-1].split() == [f"{ti_other:.1f}", f"{ti_non:.1f}"], rows[name]
    assert rows["Qwen3-14B-Base"].split("|")[-1].split() == ["—", "—"]
    assert "65.4" in rows["rl"]  # ACPBench, the mean of the two mcq subtasks

    doc = json.loads((out / "ti.json").read_text())
    assert doc["method"] == "relative" and doc["base"]["name"] == "Qwen3-14B-Base"
    assert list(doc["models"]) == ["sft-think", "sft-nothink", "rl"]
    for name, want in RELATIVE.items():
        got = (doc["models"][name]["ti_other"], doc["models"][name]["ti_non"])
        assert got == pytest.approx(want, abs=0.05), name
    assert doc["models"]["rl"]["scores"]["acpbench"] == pytest.approx(65.4)
    assert doc["models"]["rl"]["file"] == str(files["rl"])

    assert (out / "ti.png").read_bytes().startswith(PNG_SIGNATURE)
    page = (out / "ti.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "sft-nothink" in page and "741.5" in page
    assert f"png: {out / 'ti.png'}" in captured.out


def test_domain_paper_sigma_and_pooled(files, tmp_path, capsys):
    out = tmp_path / "domain"
    rc = main(["ti", "--base", str(files["base"]), *_tuned_args(files), "--method", "domain",
               "--sigma", "math=1,other=1.13556,non=1.27531", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "ti.json").read_text())
    assert doc["base"]["name"] == "base" and doc["sigma"] == {"math": 1.0, "other": 1.13556, "non": 1.27531}
    for name, want in PAPER.items():
        assert (doc["models"][name]["ti_other"], doc["models"][name]["ti_non"]) == pytest.approx(want, abs=0.05)
    rc = main(["ti", "--base", str(files["base"]), *_tuned_args(files), "--method", "domain", "--sigma", "pooled",
               "--out", str(out)])
    assert rc == 0 and json.loads((out / "ti.json").read_text())["sigma_source"] == "pooled"
    assert "(pooled)" in capsys.readouterr().out


def test_tuned_name_defaults_to_stem_and_print_only(files, tmp_path, capsys):
    rc = main(["ti", "--base", str(files["base"]), "--tuned", str(files["rl"])])
    out = capsys.readouterr().out
    assert rc == 0 and "results_rl" in out and "83.9" in out and "29.3" in out
    assert not (tmp_path / "ti.json").exists()


def test_undefined_ti_is_printed_with_its_reason(files, tmp_path, capsys):
    base = tmp_path / "zero.json"
    base.write_text(json.dumps({**SCORES["base"], "coqa": 0.0}))
    rc = main(["ti", "--base", str(base), "--tuned", f"rl={files['rl']}", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "rl: TI_non undefined" in out and "coqa" in out
    doc = json.loads((tmp_path / "o" / "ti.json").read_text())
    assert doc["models"]["rl"]["ti_non"] is None and "coqa" in doc["models"]["rl"]["reasons"]["ti_non"]


@pytest.mark.parametrize("extra,match", [
    (["--tuned", "x=missing.json"], "missing.json: no such scores file"),
    (["--sigma", "1.0"], "--sigma applies to --method domain only"),
    (["--method", "domain", "--sigma", "math=1,other=2"], "missing ['non']"),
    (["--method", "domain", "--sigma", "wide"], "--sigma: 'wide' is not a number"),
    (["--method", "domain", "--sigma", "math=1,misc=2,non=1"], "'misc=2' is not GROUP=NUMBER"),
    (["--method", "domain", "--sigma", "-1"], "positive finite"),
    (["--tuned", "=x.json"], "'=x.json': expected NAME=FILE or FILE"),
], ids=["missing-file", "sigma-relative", "sigma-partial", "sigma-word", "sigma-group", "sigma-negative", "no-name"])
def test_errors_are_one_line_and_exit_2(files, capsys, extra, match):
    rc = main(["ti", "--base", str(files["base"]), "--tuned", f"rl={files['rl']}", *extra])
    _assert_one_line_error(rc, capsys.readouterr().err, match)


def test_same_name_twice_is_an_error(files, capsys):
    rc = main(["ti", "--base", str(files["base"]), "--tuned", str(files["rl"]), "--tuned", str(files["rl"])])
    _assert_one_line_error(rc, capsys.readouterr().err, "model name 'results_rl' is used twice")


def _assert_one_line_error(rc: int, stderr: str, match: str) -> None:
    err = stderr.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("driftscope ti: error: ") and match in err[0], err


def test_bad_json_names_the_file(files, tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text('{"coqa": 1,}')
    assert main(["ti", "--base", str(files["base"]), "--tuned", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"driftscope ti: error: {bad}: not JSON: line 1") and err.count("\n") == 1


def test_without_matplotlib_html_only(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plots, "unavailable", lambda: "plots need matplotlib, which did not import (test)")
    out = tmp_path / "nompl"
    assert main(["ti", "--base", str(files["base"]), *_tuned_args(files), "--out", str(out)]) == 0
    assert not (out / "ti.png").exists() and (out / "ti.json").exists()
    page = (out / "ti.html").read_text(encoding="utf-8")
    assert "no ti.png: plots need matplotlib" in page and "data:image/png" not in page and "741.5" in page
    assert "no ti.png" in capsys.readouterr().err
