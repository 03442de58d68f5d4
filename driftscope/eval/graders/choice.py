"""Multiple choice: the response's letter (see `extract_choice`) against the gold letter."""
from __future__ import annotations

from driftscope.eval.graders.text import extract_choice, strip_thinking


def grade_choice(response: str, gold_letter: str, letters: str = "ABCD") -> float:
    """1.0 when the letter extracted from the response (thinking stripped) is ``gold_letter``, else 0.0.

    No extractable letter scores 0. ``gold_letter`` may carry brackets or spaces (``"(B)"``, lm-eval's GPQA
    target); it must name one of ``letters``.
    """
    gold = gold_letter.strip().strip("()").strip()
    if len(gold) != 1 or gold not in letters:
        raise ValueError(f"gold_letter must be one of {letters!r}, got {gold_letter!r}")
    return 1.0 if extract_choice(strip_thinking(response), letters) == gold else 0.0
