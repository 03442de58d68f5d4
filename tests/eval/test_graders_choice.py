"""Multiple-choice grading: hand-written letters, and the real UniReason-RL GPQA-Diamond responses."""
from __future__ import annotations

import csv
import json
import re

import pytest

from driftscope.eval.graders.choice import grade_choice


@pytest.mark.parametrize("response,gold,expected", [
    ("<think>maybe (A)</think>\nFinal Answer: \\boxed{C}", "C", 1.0),
    ("<think>the answer is C</think>", "C", 0.0),  # a thinking-only answer does not count
    ("<think>never closed... the answer is C", "C", 0.0),
    ("So the answer is (B).", "(B)", 1.0),  # lm-eval GPQA targets carry brackets
    ("Answer: D", "B", 0.0),
    ("no letter here", "A", 0.0),
], ids=["boxed-after-think", "only-in-think", "unclosed-think", "bracket-gold", "wrong", "none"])
def test_grade_choice(response, gold, expected):
    assert grade_choice(response, gold) == expected


def test_bad_gold():
    with pytest.raises(ValueError, match="gold_letter"):
        grade_choice("Answer: A", "E")


def _gpqa_preprocess(text: str) -> str:
    """lm-eval's gpqa `preprocess`, which wrote the option texts in these prompts."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def test_rl_gpqa_diamond_responses_accuracy(shared_data):
    rows = list(csv.DictReader((shared_data / "benchmarks" / "gpqa_diamond.csv").open(encoding="utf-8")))
    responses = [json.loads(line) for line in
                 (shared_data / "responses" / "UniReason-RL_gpqa_diamond_cot_zeroshot.jsonl").open(encoding="utf-8")]
    assert len(rows) == len(responses) == 198
    scores, unscorable = [], 0
    for row, resp in zip(rows, responses):
        assert row["Question"].strip()[:40] in resp["input"]  # same order as the CSV
        # The options were shuffled when the prompts were made; read the gold letter back from the prompt.
        block = re.search(r"Choices:\n(.*?)\nFinish", resp["input"], re.S).group(1)
        options = dict(re.findall(r"(?:^|\n)([A-D])\. (.*?)(?=\n[A-D]\. |\Z)", block, re.S))
        gold = [k for k, v in options.items() if v.strip() == _gpqa_preprocess(row["Correct Answer"])]
        if len(gold) != 1:
            unscorable += 1  # one item's four options are identical after preprocessing
            continue
        scores.append(grade_choice(resp["output"], gold[0]))
    acc = sum(scores) / len(scores)
    print(f"UniReason-RL GPQA-Diamond: {100 * acc:.1f}% of {len(scores)} scorable ({unscorable} not)")
    assert unscorable <= 2
    assert 0.25 <= acc <= 0.8  # a third of these responses are truncated before answering
