"""CoQA exact match and F1, computed as the official CoQA evaluation script (and lm-eval's coqa task) does.

Answers are normalized (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed) and
F1 is over the bag of normalized tokens. With one gold answer a turn scores against it; with n > 1 golds the
official script averages n leave-one-out scores, each the best match against the other n - 1 golds, so a
prediction equal to one of two different golds gets EM 0.5, not 1.
"""
from __future__ import annotations

import re
import string
from collections import Counter

from driftscope.eval.graders.text import strip_thinking

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str) -> float:
    """Token F1; when either side has no tokens, 1.0 if both have none, else 0.0 (the official rule)."""
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def coqa_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    """``{"em": ..., "f1": ...}`` for one turn, each in [0, 1].

    The prediction is taken as lm-eval's coqa task takes it: thinking stripped (text up to the last
    ``</think>`` removed), then surrounding whitespace stripped and only the first line kept.
    """
    if not golds:
        raise ValueError("golds must hold at least one gold answer, got an empty list")
    pred = strip_thinking(prediction).strip().split("\n")[0]
    if len(golds) == 1:
        return {"em": exact(golds[0], pred), "f1": f1(golds[0], pred)}
    em_sum = f1_sum = 0.0
    for i in range(len(golds)):
        others = golds[:i] + golds[i + 1:]
        em_sum += max(exact(g, pred) for g in others)
        f1_sum += max(f1(g, pred) for g in others)
    return {"em": em_sum / len(golds), "f1": f1_sum / len(golds)}
