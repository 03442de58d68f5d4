"""Math graders on the real benchmarks: gold answers score 1, other items' answers 0, equal forms agree,
grading works off the main thread, and a hung or crashing worker costs one item, not the batch."""
from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

pytest.importorskip("math_verify")

from driftscope.eval.graders.math import (  # noqa: E402
    MathGrader,
    gold_latex,
    grade_boxed_exact,
    grade_math,
    grade_math_local,
    normalize_boxed,
)


def _jsonl(path):
    return [json.loads(line) for line in path.open(encoding="utf-8")]


@pytest.fixture(scope="module")
def grader():
    with MathGrader(workers=2) as g:
        yield g


_DELIMITER = re.compile(r"(?<!\\)\$")  # a math $, not a currency \$


def _boxed(answer: str) -> str:
    body = _DELIMITER.sub("", answer)
    return f"Final Answer: \\boxed{{{body}}}"


def test_every_math500_gold_scores_one(shared_data, grader):
    rows = _jsonl(shared_data / "benchmarks" / "math500.jsonl")
    assert grader.grade_many([("\\boxed{1}", "1")]) == [1.0]  # workers started: time the grading alone
    t0 = time.perf_counter()
    scores = grader.grade_many((_boxed(r["answer"]), r["answer"]) for r in rows)
    took = time.perf_counter() - t0
    print(f"500 math-verify grades in {took:.2f} s with {grader.workers} workers")
    bad = [r["answer"] for r, s in zip(rows, scores) if s != 1.0]
    assert len(scores) == 500 and not bad, f"{len(bad)} gold answers not accepted, first: {bad[:5]}"
    assert not grader.notes


def test_every_math500_gold_matches_itself_as_a_string(shared_data):
    rows = _jsonl(shared_data / "benchmarks" / "math500.jsonl")
    bad = [r["answer"] for r in rows if grade_boxed_exact(_boxed(r["answer"]), r["answer"]) != 1.0]
    assert not bad, f"{len(bad)} gold answers fail the boxed string match, first: {bad[:5]}"


def test_other_items_integer_answers_score_zero(shared_data, grader):
    rows = _jsonl(shared_data / "benchmarks" / "math500.jsonl")
    ints = [r["answer"] for r in rows if re.fullmatch(r"-?\d+", r["answer"])]
    pairs = [(_boxed(b), a) for a, b in zip(ints, ints[1:] + ints[:1]) if int(a) != int(b)]
    assert len(pairs) > 200
    scores = grader.grade_many(pairs)
    wrong = [p for p, s in zip(pairs, scores) if s != 0.0]
    assert not wrong, f"{len(wrong)} different integers accepted, first: {wrong[:3]}"
    assert all(grade_boxed_exact(r, g) == 0.0 for r, g in pairs)


def test_aime_golds_and_shifted_golds(shared_data, grader):
    rows = _jsonl(shared_data / "benchmarks" / "aime24.jsonl") + _jsonl(shared_data / "benchmarks" / "aime25.jsonl")
    golds = [r["answer"] for r in rows]
    assert len(golds) == 60
    assert grader.grade_many((_boxed(g), g) for g in golds) == [1.0] * 60
    shifted = [(_boxed(golds[(i + 1) % 60]), g) for i, g in enumerate(golds)]
    assert all(int(golds[(i + 1) % 60]) != int(g) for i, g in enumerate(golds))  # AIME answers are distinct here
    assert grader.grade_many(shifted) == [0.0] * 60
    assert grade_math("The answer is \\boxed{25}.", "025") == 1.0  # AIME writes 025


def test_olympiadbench_sample(shared_data, grader):
    rows = _jsonl(shared_data / "benchmarks" / "olympiadbench.jsonl")[::9]  # 75 items, all answer types
    golds = [r["final_answer"][0] for r in rows]
    assert {r["answer_type"] for r in rows} >= {"Numerical", "Expression", "Tuple"}
    assert grader.grade_many((_boxed(g), g) for g in golds) == [1.0] * len(golds)
    assert [grade_boxed_exact(_boxed(g), g) for g in golds] == [1.0] * len(golds)
    numeric = [g for g in golds if re.fullmatch(r"-?\d+", g)]
    shifted = [(_boxed(b), a) for a, b in zip(numeric, numeric[1:]) if int(a) != int(b)]
    assert grader.grade_many(shifted) == [0.0] * len(shifted)


EQUIVALENT = [  # (response, gold): every one must score 1 under math-verify
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac12}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{ \\frac { 14 } { 3 } }", "\\frac{14}{3}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("<think>maybe \\boxed{7}</think>\n\\boxed{204}", "204"),
]
DIFFERENT = [
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{205}", "204"),
    ("<think>\\boxed{204}", "204"),  # unclosed thinking: no answer
    ("no answer given", "204"),
    ("\\boxed{your\\_answer} ... \\boxed{12}", "13"),
]


@pytest.mark.parametrize("response,gold", EQUIVALENT, ids=[f"eq{i}" for i in range(len(EQUIVALENT))])
def test_equivalent_forms_score_one(response, gold):
    assert grade_math(response, gold) == 1.0


@pytest.mark.parametrize("response,gold", DIFFERENT, ids=[f"ne{i}" for i in range(len(DIFFERENT))])
def test_different_answers_score_zero(response, gold):
    assert grade_math(response, gold) == 0.0
    assert grade_boxed_exact(response, gold) == 0.0


def test_last_box_decides_when_a_format_box_is_quoted():
    # the model restates the prompt's "\boxed{your_answer}" before answering: only its last box is graded
    text = "Present it as \\boxed{your\\_answer}.\nSo the final answer is\n$$\\boxed{-\\sqrt{3}}$$"
    assert grade_math(text, "-\\sqrt{3}") == 1.0


def test_bare_golds_parse():
    assert gold_latex("\\frac{14}{3}") == "$\\frac{14}{3}$"
    assert gold_latex("$(3,2),(-3,2)$") == "$(3,2),(-3,2)$"
    assert gold_latex("\\$18.90") == "$18.90$"
    assert grade_math("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}") == 1.0
    assert grade_math("\\boxed{(-3,2),(3,2)}", "$(3,2),(-3,2)$") == 1.0  # a set of tuples: order free


STRING_RULES = [  # normalize_boxed: (a, b) must normalize equal
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\left(1, 2\\right)", "(1,2)"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("x = 5.", "5"),
    ("\\$18.90", "18.9"),
    ("025", "25"),
    ("4.0", "4"),
    (".5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("10\\%", "10"),
    ("864 \\mbox{ inches}^2", "864"),
    ("$69$,$84$", "69,84"),
    ("\\sqrt3", "\\sqrt{3}"),
]


@pytest.mark.parametrize("a,b", STRING_RULES, ids=[f"rule{i}" for i in range(len(STRING_RULES))])
def test_normalize_boxed_rules(a, b):
    assert normalize_boxed(a) == normalize_boxed(b)


def test_normalize_boxed_keeps_matrix_rows_apart():
    assert normalize_boxed("\\begin{pmatrix} 1 \\\\ 23 \\end{pmatrix}") != normalize_boxed(
        "\\begin{pmatrix} 12 \\\\ 3 \\end{pmatrix}")


def test_boxed_exact_is_stricter_than_math_verify():
    assert grade_boxed_exact("\\boxed{0.25}", "\\frac14") == 0.0
    assert grade_math("\\boxed{0.25}", "\\frac14") == 1.0


def test_math_verify_alone_fails_off_the_main_thread_and_grade_math_does_not():
    import math_verify

    out: dict[str, object] = {}

    def work():
        try:
            math_verify.parse("$\\frac{1}{2}$")  # signal.alarm timeout: refused off the main thread
            out["raw"] = "no error"
        except ValueError as err:
            out["raw"] = err
        out["right"] = grade_math("\\boxed{0.5}", "\\frac{1}{2}")
        out["wrong"] = grade_math("\\boxed{0.4}", "\\frac{1}{2}")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert isinstance(out["raw"], ValueError), out["raw"]
    assert (out["right"], out["wrong"]) == (1.0, 0.0)


def test_local_grader_matches_the_pool(shared_data, grader):
    rows = _jsonl(shared_data / "benchmarks" / "math500.jsonl")[:20]
    pairs = [(_boxed(r["answer"]), r["answer"]) for r in rows] + [(_boxed(r["answer"]), "-1") for r in rows]
    assert grader.grade_many(pairs) == [grade_math_local(r, g) for r, g in pairs]


# Worker functions for the failure tests: module level, so spawned workers import them by name.
def _hang_on_marker(response: str, gold: str) -> float:
    if response == "hang":
        time.sleep(3600)
    return 1.0


def _die_on_marker(response: str, gold: str) -> float:
    if response == "die":
        os._exit(3)
    return 1.0


def test_a_hung_item_times_out_alone():
    pairs = [("a", ""), ("hang", ""), ("b", ""), ("c", ""), ("d", "")]
    t0 = time.perf_counter()
    with MathGrader(workers=2, timeout_s=2.0, grade_fn=_hang_on_marker) as g:
        scores = g.grade_many(pairs)
        assert g.grade_many([("after", "")]) == [1.0], g.notes  # the restarted pool still works
    assert scores == [1.0, 0.0, 1.0, 1.0, 1.0], g.notes
    assert g.restarts == 1, g.notes
    assert g.notes == ["item 1: timed out after 2 s; scored 0, pool restarted"]
    assert time.perf_counter() - t0 < 60


def test_a_crashing_item_is_found_and_scored_zero():
    pairs = [("a", ""), ("die", ""), ("b", ""), ("c", "")]
    with MathGrader(workers=2, timeout_s=30.0, grade_fn=_die_on_marker) as g:
        scores = g.grade_many(pairs)
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert len(g.notes) == 1 and g.notes[0].startswith("item 1: its math grader worker died"), g.notes


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        MathGrader(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathGrader(timeout_s=0)


@pytest.mark.slow
def test_rl_math500_responses_accuracy(shared_data, grader):
    rows = _jsonl(shared_data / "benchmarks" / "math500.jsonl")
    responses = _jsonl(shared_data / "responses" / "UniReason-RL_hendrycks_math_500.jsonl")
    assert len(responses) == 500
    assert all(r["problem"].strip()[:60] in x["input"] for r, x in zip(rows, responses))  # math500 order
    t0 = time.perf_counter()
    scores = grader.grade_many((x["output"], r["answer"]) for r, x in zip(rows, responses))
    took = time.perf_counter() - t0
    acc = sum(scores) / len(scores)
    exact = sum(grade_boxed_exact(x["output"], r["answer"]) for r, x in zip(rows, responses)) / len(rows)
    print(f"UniReason-RL MATH-500: math-verify {100 * acc:.1f}%, boxed string match {100 * exact:.1f}% "
          f"({took:.1f} s for 500 responses; paper Table 1: 87.8)")
    # These generations were cut by lm-eval's "Problem:" stop string (responses that restate "**Problem:**") or by
    # a length cap: 173 of 500 have no box, so they score well under the paper's 87.8. The band guards the grader.
    assert 0.55 <= acc <= 0.95
    assert exact <= acc
