"""HaluEval judgements: the first-line Yes/No rule by hand, on real HaluEval items, and against lm-eval's rule."""
from __future__ import annotations

import json
from itertools import islice

import pytest

from driftscope.eval.graders.halueval import grade_halueval, halueval_judgement

CASES = [
    ("Yes", "Yes"),
    ("No", "No"),
    ("  \nNo, the answer is supported.\nYes it is", "No"),  # leading blank lines stripped, first line decides
    ("Yes\nNo", "Yes"),
    ("Yes and No", None),  # both
    ("I cannot tell.", None),  # neither
    ("yes", None),  # case-sensitive, as lm-eval
    ("Not hallucinated", "No"),  # substring rule: "Not" contains "No" (lm-eval's behaviour, kept)
    ("<think>\nYes? No... Yes.\n</think>\n\nNo", "No"),
    ("<think>\nYes, surely", None),  # unclosed thinking: no answer
    ("", None),
]


@pytest.mark.parametrize("response,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_judgement(response, expected):
    assert halueval_judgement(response) == expected


def _paper_rule(response: str, gold: str) -> float:
    """The paper's lm-eval halueval `process_results` + `compute_metrics`, transcribed as the reference
    (lm-eval 0.4.13 here ships no halueval task). Its doc target is 'yes'/'no'."""
    prediction = response.strip().split("\n")[0]
    is_correct = True
    if ("Yes" in prediction and "No" in prediction) or ("Yes" not in prediction and "No" not in prediction):
        is_correct = False
    elif "Yes" in prediction:
        prediction = "yes"
    elif "No" in prediction:
        prediction = "no"
    return 1.0 if (is_correct and gold.lower() == prediction) else 0.0


NO_THINKING = [response for response, _ in CASES if "<think>" not in response]  # lm-eval strips it earlier


@pytest.mark.parametrize("response", NO_THINKING, ids=[f"case{i}" for i in range(len(NO_THINKING))])
def test_same_as_the_papers_rule(response):
    for gold in ("Yes", "No"):
        assert grade_halueval(response, gold) == _paper_rule(response, gold)


def test_real_items(shared_data):
    # the judge is right to say "No" for a right answer and "Yes" for a hallucinated one
    path = shared_data / "benchmarks" / "halueval_qa.jsonl"
    items = [json.loads(line) for line in islice(path.open(encoding="utf-8"), 50)]
    assert all(item["right_answer"] != item["hallucinated_answer"] for item in items)
    for item in items:
        for answer, gold in ((item["right_answer"], "No"), (item["hallucinated_answer"], "Yes")):
            other = "Yes" if gold == "No" else "No"
            assert grade_halueval(f"{gold}\n#Answer#: {answer}", gold) == 1.0
            assert grade_halueval(f"{other}\n#Answer#: {answer}", gold) == 0.0
            assert grade_halueval(f"{gold}, {other.lower()}", gold.lower()) == 1.0


def test_bad_gold():
    with pytest.raises(ValueError, match="gold"):
        grade_halueval("Yes", "maybe")
