"""Text helpers of the graders: thinking removal, the last \\boxed, choice-letter extraction (hand-written cases)."""
from __future__ import annotations

import json

import pytest

from driftscope.eval.graders.text import extract_choice, last_boxed, strip_thinking

THINKING = [
    ("<think>\nlet me see\n</think>\n\nThe answer is 4.", "The answer is 4."),
    ("<think>a</think>x<think>b</think>  final", "final"),  # the last </think> counts
    ("<think>\nstill thinking, out of tokens", ""),  # unclosed: all thinking
    ("no tags at all\n", "no tags at all\n"),
    ("</think>after a dangling close", "after a dangling close"),
    ("", ""),
]


@pytest.mark.parametrize("text,expected", THINKING, ids=[f"case{i}" for i in range(len(THINKING))])
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


BOXED = [
    ("so \\boxed{5}.", "5"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}", "\\left(3, \\frac{\\pi}{2}\\right)"),
    ("\\fbox{7} is it", "7"),
    ("first \\boxed{1} and last \\fbox{2}", "2"),
    ("$\\boxed 5$ done", "5"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
    ("\\boxed{}", ""),
    ("truncated \\boxed{\\frac{1}{2", None),
    ("no box here", None),
    ("\\boxed", None),
]


@pytest.mark.parametrize("text,expected", BOXED, ids=[f"case{i}" for i in range(len(BOXED))])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_on_real_math500_solutions(shared_data):
    # MATH-500's `answer` field was made from the last box of its `solution`: an independent expectation
    rows = [json.loads(line) for line in (shared_data / "benchmarks" / "math500.jsonl").open(encoding="utf-8")]
    mismatches = [(r["unique_id"], last_boxed(r["solution"]), r["answer"]) for r in rows
                  if last_boxed(r["solution"]) != r["answer"]]
    assert not mismatches, f"{len(mismatches)} of 500 differ, first (id, last box, answer): {mismatches[:3]}"


CHOICES = [
    ("Final Answer: \\boxed{C}", "C"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{\\text{D}}", "D"),
    ("\\boxed{A. 10^{-4} eV}", "A"),
    ("Answer: C", "C"),
    ("So the answer is (B).", "B"),
    ("the answer is D because the energy is larger", "D"),
    ("Final Answer: **B**", "B"),
    ("The correct option is C.", "C"),
    ("the correct choice is **Choice A** because", "A"),
    ("I think (A) is wrong, (B) is tempting, but (C) fits.", "C"),
    ("Answer: A\n...\nOn reflection, Answer: D", "D"),  # last occurrence wins
    ("The answer is (A).\n\\boxed{B}", "B"),  # a box outranks a phrase
    ("\\boxed{42}\nthe answer is (C)", "C"),  # a box that is not a letter falls through
    ("Options:\nA. one\nB. two\n", None),  # listing options is not answering
    ("After all that, the pick is\nB", "B"),  # last line is only the letter
    ("Chlorine, Cl, is the element.", None),  # Cl is not C
    ("I cannot decide.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", CHOICES, ids=[f"case{i}" for i in range(len(CHOICES))])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_letters():
    assert extract_choice("Answer: E", letters="ABCDE") == "E"
    assert extract_choice("Answer: E") is None
    with pytest.raises(ValueError, match="distinct upper-case"):
        extract_choice("Answer: a", letters="abcd")
