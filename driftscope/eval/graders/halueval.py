"""HaluEval judgements: the paper's (and lm-eval's halueval task's) rule on the first line of the response.

The response, thinking stripped and surrounding whitespace stripped, is cut to its first line. That line is a
"Yes" when it contains the substring ``Yes`` and not ``No``, a "No" when it contains ``No`` and not ``Yes``, and
no judgement otherwise (neither, or both). Matching is case-sensitive substring matching, as in lm-eval's
``compute_metrics`` (from HaluEval's ``evaluate.py``): ``yes`` is not a judgement, while ``Not sure`` and
``None`` count as "No" because they contain ``No``.
"""
from __future__ import annotations

from typing import Literal

from driftscope.eval.graders.text import strip_thinking

Judgement = Literal["Yes", "No"]


def halueval_judgement(response: str) -> Judgement | None:
    """The judgement, "Yes" or "No", or None when the first line holds neither or both (see the module docstring)."""
    line = strip_thinking(response).strip().split("\n")[0]
    has_yes, has_no = "Yes" in line, "No" in line
    if has_yes == has_no:
        return None
    return "Yes" if has_yes else "No"


def grade_halueval(response: str, gold: str) -> float:
    """1.0 when the judgement equals ``gold`` ("Yes": the answer is hallucinated, "No": it is not), else 0.0.

    ``gold`` may also be lower case (``"yes"``/``"no"``, the ``hallucination`` field of lm-eval's HaluEval data).
    """
    if gold not in ("Yes", "No", "yes", "no"):
        raise ValueError(f"gold must be 'Yes' or 'No', got {gold!r}")
    return 1.0 if halueval_judgement(response) == gold.capitalize() else 0.0
