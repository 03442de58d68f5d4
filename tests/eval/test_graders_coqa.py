"""CoQA EM/F1: values worked out by hand, the official leave-one-out rule, and agreement with lm-eval's code."""
from __future__ import annotations

import json
import re
from itertools import islice

import pytest

from driftscope.eval.graders.coqa import coqa_scores, normalize_answer


def test_normalize_answer():
    assert normalize_answer("The  Cat's, hat!") == "cats hat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


@pytest.mark.parametrize("pred,golds,em,f1", [
    ("The white cat.", ["white cat"], 1.0, 1.0),
    ("white", ["white cat"], 0.0, 2 / 3),  # P = 1, R = 1/2
    ("a big white cat", ["white cat sat"], 0.0, 2 * (2 / 3) * (2 / 3) / (4 / 3)),  # P = 2/3, R = 2/3
    ("black dog", ["white cat"], 0.0, 0.0),
    ("", [""], 1.0, 1.0),  # both empty: agree
    ("the", ["white"], 0.0, 0.0),  # normalizes to nothing: F1 0 against a non-empty gold
    ("white\nand more lines", ["white"], 1.0, 1.0),  # only the first line is the answer
    ("<think>black</think>\n white", ["white"], 1.0, 1.0),  # thinking stripped
    # leave-one-out over 3 golds: drop "white" -> best of {"a white cat","black"} = (0, 2/3); drop either
    # other -> "white" remains = (1, 1): EM 2/3, F1 (2/3 + 1 + 1) / 3
    ("white", ["white", "a white cat", "black"], 2 / 3, (2 / 3 + 2) / 3),
    ("white", ["white", "black"], 0.5, 0.5),  # equal to one of two golds: 0.5, not 1
    ("white", ["white", "White."], 1.0, 1.0),
])
def test_scores_by_hand(pred, golds, em, f1):
    got = coqa_scores(pred, golds)
    assert got == pytest.approx({"em": em, "f1": f1})


def test_empty_golds():
    with pytest.raises(ValueError, match="golds"):
        coqa_scores("x", [])


def test_real_coqa_answers(shared_data):
    """The answers in the real CoQA prompts (the earlier turns of each conversation) score 1 against themselves,
    and 0 against an answer of another story that shares no normalized token with them."""
    path = shared_data / "responses" / "UniReason-RL_coqa.jsonl"
    answers = []
    for line in islice(path.open(encoding="utf-8"), 100):
        answers.append(re.findall(r"\nA: (.*?)\n", json.loads(line)["input"]))
    assert sum(map(len, answers)) > 500
    for story in answers:
        for gold in story:
            assert coqa_scores(f"  {gold}\n\nQ: next question", [gold]) == {"em": 1.0, "f1": 1.0}
    disjoint = 0
    for story, other in zip(answers, answers[1:]):
        for gold, pred in zip(story, other):
            if normalize_answer(gold) and not set(normalize_answer(gold).split()) & set(normalize_answer(pred).split()):
                assert coqa_scores(pred, [gold]) == {"em": 0.0, "f1": 0.0}
                disjoint += 1
    assert disjoint > 100
