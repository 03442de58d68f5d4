"""Transferability Index: DESIGN §3's reference values for both methods and three σ settings, the pooled σ against
numpy, NaN-with-a-reason for every undefined case, and reading scores from plain, scores.json and lm-eval files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from driftscope.eval.benchmarks import acp_subtask, canonical_name
from driftscope.eval.scores import load_scores, read_scores
from driftscope.eval.ti import BENCHMARKS, GROUPS, pooled_sigma, transferability_index, transferability_indices

# DESIGN §3 / paper Table 1, in that table's column order (the non group reads CoQA, MC-TACO, IFEval, HaluEval).
TABLE_ORDER = ("aime24", "aime25", "math500", "olympiadbench", "gpqa_diamond", "livecodebench", "acpbench", "headqa",
               "coqa", "mctaco", "ifeval", "halueval")
TABLE = {
    "base":        "13.0  9.3 60.4 27.9 | 42.6 29.7 10.7 37.6 | 10.0 67.7 69.2 35.7",
    "sft-think":   "52.0 37.0 85.0 25.0 | 55.9 21.9 68.6 34.8 |  1.7 38.2 42.3  2.3",
    "sft-nothink": "16.0 13.0 77.2 22.7 | 48.7 23.5 69.3 35.0 |  5.3 66.1 41.4  3.3",
    "rl":          "55.7 38.0 87.8 33.8 | 57.7 40.6 65.4 40.2 | 28.2 74.0 70.0 40.7",
}
SCORES = {name: dict(zip(TABLE_ORDER, map(float, row.replace("|", " ").split()))) for name, row in TABLE.items()}
BASE = SCORES["base"]
TUNED = {n: s for n, s in SCORES.items() if n != "base"}
PAPER_SIGMA = {"math": 1.0, "other": 1.13556, "non": 1.27531}
EXPECTED = {  # (method, sigma id) -> model -> (TI_other, TI_non)
    ("relative", "none"): {"sft-think": (85.7, -41.2), "sft-nothink": (741.5, -250.3), "rl": (83.9, 29.3)},
    ("domain", "sigma1"): {"sft-think": (55.664, -117.520), "sft-nothink": (176.249, -314.971),
                           "rl": (87.676, 58.957)},
    ("domain", "paper"): {"sft-think": (52.2, -104.1), "sft-nothink": (165.4, -278.9), "rl": (82.3, 52.2)},
}
SIGMAS = {"none": None, "sigma1": 1.0, "paper": PAPER_SIGMA}


# ---- reference values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(TUNED))
@pytest.mark.parametrize("method,sigma_id", list(EXPECTED), ids=lambda v: str(v))
def test_design_reference_values(method, sigma_id, model):
    r = transferability_index(BASE, TUNED[model], method=method, sigma=SIGMAS[sigma_id])
    want = EXPECTED[(method, sigma_id)][model]
    got = (r.ti_other, r.ti_non)
    assert got == pytest.approx(want, abs=0.05), f"{method}/{sigma_id}/{model}: got {got}, want {want}"
    assert r.reasons == {}


def test_many_models_equal_one_at_a_time():
    many = transferability_indices(BASE, TUNED, "domain", PAPER_SIGMA)
    for name, scores in TUNED.items():
        one = transferability_index(BASE, scores, "domain", PAPER_SIGMA)
        assert (many[name].ti_other, many[name].ti_non) == (one.ti_other, one.ti_non)
        assert many[name].sigma == PAPER_SIGMA


def _numpy_ti(base: dict, tuned: dict, method: str, sigma: dict) -> tuple[float, float]:
    """An independent array version of DESIGN §3."""
    gains = {}
    for g, names in GROUPS.items():
        rb = np.array([base[b] for b in names])
        rt = np.array([tuned[b] for b in names])
        if method == "relative":
            gains[g] = np.mean((rt - rb) / rb)
        else:
            d = (rt - rb) / sigma[g]
            w = (100 - rb) / np.sum(100 - rb)
            gains[g] = np.sum(w * np.sign(d) * np.sqrt(np.abs(d)))
    return 100 * gains["other"] / gains["math"], 100 * gains["non"] / gains["math"]


def test_relative_matches_numpy_on_every_model():
    for name, scores in TUNED.items():
        r = transferability_index(BASE, scores)
        assert (r.ti_other, r.ti_non) == pytest.approx(_numpy_ti(BASE, scores, "relative", {}), rel=1e-12)
        assert r.deltas["coqa"] == pytest.approx((scores["coqa"] - 10.0) / 10.0, rel=1e-12)


def test_pooled_sigma_matches_numpy():
    want = {g: float(np.std([TUNED[m][b] - BASE[b] for m in TUNED for b in names])) for g, names in GROUPS.items()}
    assert pooled_sigma(BASE, TUNED) == pytest.approx(want, rel=1e-12)
    results = transferability_indices(BASE, TUNED, "domain", "pooled")
    for name, r in results.items():
        assert r.sigma == pytest.approx(want, rel=1e-12) and r.sigma_source == "pooled"
        assert (r.ti_other, r.ti_non) == pytest.approx(_numpy_ti(BASE, TUNED[name], "domain", want), rel=1e-12)
    # pooled over the run, not per model: one model alone pools to a different σ
    alone = transferability_index(BASE, TUNED["rl"], "domain", "pooled")
    assert alone.sigma != pytest.approx(want, rel=1e-3)


# ---- undefined values: NaN with a reason -----------------------------------------------------------------------
def test_zero_base_score_relative_is_nan_with_reason():
    base = {**BASE, "coqa": 0.0}
    r = transferability_index(base, TUNED["rl"])
    assert math.isnan(r.ti_non) and math.isnan(r.gains["non"]) and math.isnan(r.deltas["coqa"])
    assert "coqa" in r.reasons["ti_non"] and "0" in r.reasons["deltas.coqa"]
    assert r.ti_other == pytest.approx(83.9, abs=0.05) and "ti_other" not in r.reasons
    # domain is defined with a zero base score
    d = transferability_index(base, TUNED["rl"], "domain")
    assert math.isfinite(d.ti_non) and d.reasons == {}


@pytest.mark.parametrize("method", ["relative", "domain"])
def test_zero_math_gain_is_nan_with_reason(method):
    tuned = {**TUNED["rl"], **{b: BASE[b] for b in GROUPS["math"]}}
    r = transferability_index(BASE, tuned, method)
    assert r.gains["math"] == 0.0 and math.isfinite(r.gains["other"])
    assert math.isnan(r.ti_other) and math.isnan(r.ti_non)
    for key in ("ti_other", "ti_non"):
        assert "math gain" in r.reasons[key] and "is 0" in r.reasons[key]


@pytest.mark.parametrize("method", ["relative", "domain"])
def test_missing_benchmark_is_nan_naming_it(method):
    tuned = {k: v for k, v in TUNED["rl"].items() if k != "halueval"}
    r = transferability_index(BASE, tuned, method)
    assert math.isnan(r.ti_non) and "halueval" in r.reasons["ti_non"] and "tuned" in r.reasons["ti_non"]
    assert math.isfinite(r.ti_other)
    base = {k: v for k, v in BASE.items() if k != "aime25"}
    r = transferability_index(base, TUNED["rl"], method)
    assert math.isnan(r.ti_other) and math.isnan(r.ti_non)
    assert "aime25" in r.reasons["ti_other"] and "base" in r.reasons["ti_other"]


def test_pooled_sigma_without_spread_is_nan_with_reason():
    tuned = {**TUNED["rl"], **{b: BASE[b] + 5.0 for b in GROUPS["other"]}}  # every ΔR_other = 5: σ_other = 0
    r = transferability_index(BASE, tuned, "domain", "pooled")
    assert r.sigma["other"] == 0.0 and math.isnan(r.ti_other) and "σ_other is 0" in r.reasons["ti_other"]
    assert math.isfinite(r.ti_non)


def test_to_dict_is_strict_json_with_reasons():
    r = transferability_index({**BASE, "coqa": 0.0}, TUNED["rl"])
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["ti_non"] is None and d["deltas"]["coqa"] is None and d["reasons"]["ti_non"]
    assert d["ti_other"] == pytest.approx(83.9, abs=0.05) and d["method"] == "relative" and d["sigma"] is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="absolute"), "method must be one of"),
    (dict(method="relative", sigma=1.0), "sigma applies to method='domain' only"),
    (dict(method="domain", sigma={"math": 1.0, "other": 1.0}), "missing \\['non'\\]"),
    (dict(method="domain", sigma=0.0), "positive finite"),
    (dict(method="domain", sigma="mean"), "'pooled'"),
], ids=["method", "sigma-relative", "sigma-partial", "sigma-zero", "sigma-word"])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        transferability_index(BASE, TUNED["rl"], **kwargs)


@pytest.mark.parametrize("scores,match", [
    ({**BASE, "mmlu": 50.0}, "unknown benchmark 'mmlu'"),
    ({**BASE, "coqa": 101.0}, "coqa = 101.0 is not a percentage"),
    ({**BASE, "coqa": "high"}, "coqa must be a number"),
], ids=["unknown", "range", "type"])
def test_bad_scores_raise(scores, match):
    with pytest.raises(ValueError, match=match):
        transferability_index(scores, TUNED["rl"])


def test_aliases():
    assert len(BENCHMARKS) == 12 and all(canonical_name(b) == b for b in BENCHMARKS)
    for alias, bench in [("MC-TACO", "mctaco"), ("mc_taco", "mctaco"), ("hendrycks_math500", "math500"),
                         ("hendrycks_math_500", "math500"), ("MATH-500", "math500"), ("aime_2024", "aime24"),
                         ("gpqa_diamond_cot_zeroshot", "gpqa_diamond"), ("GPQA-Diamond", "gpqa_diamond"),
                         ("headqa_en", "headqa"), ("head_qa", "headqa"), ("olympiad", "olympiadbench"),
                         ("lcb", "livecodebench"), ("IFEval", "ifeval"), ("HaluEval", "halueval")]:
        assert canonical_name(alias) == bench, alias
    assert canonical_name("mmlu") is None
    assert acp_subtask("acp_app_mcq") == "mcq" and acp_subtask("acp_act_reach_bool") == "bool"
    assert acp_subtask("acp_bench") is None and acp_subtask("acp_app_gen_with_pddl") is None


# ---- reading score files ---------------------------------------------------------------------------------------
def _write(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return str(path)


def test_plain_json_is_percent_with_aliases(tmp_path):
    path = _write(tmp_path, "plain.json", {"MC-TACO": 67.7, "hendrycks_math500": 60.4, "model": "qwen",
                                           "coqa": 0.5})
    sf = load_scores(path)
    assert sf.layout == "plain" and sf.scores == {"math500": 60.4, "coqa": 0.5, "mctaco": 67.7}
    assert list(sf.scores) == [b for b in BENCHMARKS if b in sf.scores]  # canonical order
    assert sf.ignored == {"model": "not a known benchmark"}
    frac = read_scores(_write(tmp_path, "frac.json", {"coqa": 0.5, "ifeval": 1}), fraction=True)
    assert frac == {"coqa": 50.0, "ifeval": 100.0}


def test_driftscope_scores_json(tmp_path):
    path = _write(tmp_path, "scores.json", {"format": "driftscope.scores/1", "model": "m",
                                            "scores": {"aime24": 13.0, "gpqa_diamond": 42.6, "halueval": None},
                                            "details": {"aime24": {"n": 30, "correct": 4}}})
    sf = load_scores(path, fraction=True)  # fraction does not apply to scores.json
    assert sf.layout == "driftscope" and sf.scores == {"aime24": 13.0, "gpqa_diamond": 42.6}
    assert "halueval" in sf.ignored


def _lm_eval_results() -> dict:
    def task(alias, **metrics):
        out = {"alias": alias}
        for k, v in metrics.items():
            metric, _, filt = k.partition("__")
            out[f"{metric},{filt or 'none'}"] = v
            out[f"{metric}_stderr,{filt or 'none'}"] = "N/A"
        return out
    return {
        "results": {
            "aime24": task("aime24", exact_match=0.13),
            "hendrycks_math500": task("hendrycks_math500", exact_match=0.604),
            "gpqa_diamond_cot_zeroshot": task("gpqa", **{"exact_match__strict-match": 0.10,
                                                         "exact_match__flexible-extract": 0.426}),
            "acp_bench": {"alias": "acp_bench", "exact_match,mcq-extract": 0.99},
            "acp_app_mcq": task(" - acp_app_mcq", **{"exact_match__mcq-extract": 0.2}),
            "acp_prog_mcq": task(" - acp_prog_mcq", **{"exact_match__mcq-extract": 0.05}),
            "acp_app_bool": task(" - acp_app_bool", **{"exact_match__boolq-extract": 0.7}),
            "headqa_en": task("headqa_en", acc=0.376, acc_norm=0.41),
            "coqa": task("coqa", em=0.10, f1=0.2),
            "ifeval": task("ifeval", prompt_level_strict_acc=0.6, inst_level_strict_acc=0.692,
                           prompt_level_loose_acc=0.65, inst_level_loose_acc=0.7),
            "mc_taco": task("mc_taco", acc=0.677, f1=0.5),
            "arc_easy": task("arc_easy", acc=0.8),
        },
        "groups": {"acp_bench": {"alias": "acp_bench", "exact_match,mcq-extract": 0.99}},
        "group_subtasks": {"acp_bench": ["acp_app_mcq", "acp_prog_mcq", "acp_app_bool"], "aime24": []},
        "configs": {}, "versions": {}, "n-shot": {},
    }


def test_lm_eval_results(tmp_path):
    sf = load_scores(_write(tmp_path, "results_2025-01-01.json", _lm_eval_results()))
    assert sf.layout == "lm-eval"
    want = {"aime24": 13.0, "math500": 60.4, "gpqa_diamond": 42.6, "acpbench": 12.5, "headqa": 37.6,
            "coqa": 10.0, "ifeval": 69.2, "mctaco": 67.7}
    assert sf.scores == pytest.approx(want, abs=1e-9)
    assert sf.sources["gpqa_diamond"].endswith("exact_match,flexible-extract")
    assert "mean of 2 ACPBench mcq tasks" in sf.sources["acpbench"]
    assert set(sf.ignored) == {"acp_bench", "arc_easy", "acp_app_bool"}


def test_lm_eval_driftscope_ds_tasks(tmp_path):
    """driftscope's own tasks (eval/tasks/ds_*.yaml): one "score" metric (a fraction), filters such as all_samples."""
    data = {"results": {"ds_math500": {"alias": "ds_math500", "score,all_samples": 0.604,
                                       "score_stderr,all_samples": 0.01},
                        "ds_acpbench": {"alias": "ds_acpbench", "score,none": 0.107},
                        "ds_headqa": {"alias": "ds_headqa", "acc,none": 0.376, "acc_stderr,none": 0.01}},
            "group_subtasks": {"ds_math500": [], "ds_acpbench": [], "ds_headqa": []}}
    sf = load_scores(_write(tmp_path, "ds.json", data))
    assert sf.scores == pytest.approx({"math500": 60.4, "acpbench": 10.7, "headqa": 37.6})
    assert sf.sources["math500"] == "ds_math500: score,all_samples"


def test_lm_eval_bool_acp_when_no_mcq(tmp_path):
    data = {"results": {"acp_app_bool": {"exact_match,boolq-extract": 0.5},
                        "acp_reach_bool": {"exact_match,boolq-extract": 0.7}}}
    assert read_scores(_write(tmp_path, "r.json", data)) == pytest.approx({"acpbench": 60.0})


@pytest.mark.parametrize("content,match", [
    ('{"coqa": 10,\n "ifeval" 5}', r"not JSON: line 2, column 11"),
    ("[1, 2]", "expected a JSON object"),
    ({"model": "x", "mmlu": 50}, r"no recognizable benchmark \(plain layout\); keys seen: model, mmlu"),
    ({"coqa": "ten"}, r"coqa is not a number: 'ten'"),
    ({"coqa": True}, r"coqa is not a number: True"),
    ({"coqa": 150}, r"coqa = 150 is not a percentage in \[0, 100\]"),
    ({"scores": [1, 2]}, r"\"scores\" must be an object"),
    ({"format": "driftscope.scores/2", "scores": {"coqa": 1}}, r"format 'driftscope.scores/2' is not"),
    ({"scores": {"coqa": "x"}}, r"scores.coqa is not a number"),
    ({"results": {"coqa": {"em,none": 10.0}}}, r"results.coqa.em,none = 10.0 is not a fraction in \[0, 1\]"),
    ({"results": {"coqa": {"em,none": "x"}}}, r"results.coqa.em,none is not a number"),
    ({"results": {"coqa": {"bleu,none": 0.3}}},
     r"results.coqa has none of the metrics em, f1, score \(has: bleu,none\)"),
    ({"results": {"arc": {"acc,none": 0.3}}}, r"no recognizable benchmark \(lm-eval layout\); keys seen: arc"),
    ({"math500": 60, "hendrycks_math500": 61}, r"both 'math500' and 'hendrycks_math500' name math500"),
    ({"acpbench": 10, "acp_app_mcq": 20}, r"both 'acpbench' and ACPBench subtasks"),
], ids=["syntax", "array", "no-benchmark", "string", "bool", "range", "scores-array", "scores-format", "scores-string",
        "lm-eval-percent", "lm-eval-string", "lm-eval-metric", "lm-eval-unknown", "duplicate", "acp-duplicate"])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, content, match):
    path = _write(tmp_path, "bad_scores.json", content)
    with pytest.raises(ValueError, match=match) as info:
        read_scores(path)
    msg = str(info.value)
    assert msg.startswith(path) and "\n" not in msg, msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such scores file") as info:
        read_scores(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(info.value)
    with pytest.raises(ValueError, match="is a folder"):
        read_scores(tmp_path)
