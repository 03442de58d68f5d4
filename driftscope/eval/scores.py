"""Reads a model's benchmark scores from a JSON file into `{canonical benchmark: percent}` (`benchmarks.ALIASES`).

Three layouts are recognized, by shape:

1. plain: `{"aime24": 13.0, "MC-TACO": 67.7, ...}`. Values are percent in [0, 100] (an out-of-range value is an
   error, never rescaled by guess); with `fraction=True` (CLI `--fraction`) they are fractions in [0, 1] instead.
2. driftscope `scores.json`, what `driftscope eval` writes::

       {"format": "driftscope.scores/1",            # optional; any other value is an error
        "model": "path or name",                     # optional, informational
        "scores": {"aime24": 13.0, ...},             # required: benchmark -> percent in [0, 100], or null
        "details": {"aime24": {"metric": "exact_match", "n": 30, "correct": 4, ...}, ...}}  # optional, free-form

   `scores` keys are canonical names or aliases; a null score means "not scored" and reads as missing. Any other
   top-level key is ignored. `fraction` does not apply: scores.json is always percent.
3. lm-eval results (any backend: hf, vllm, ...): `{"results": {task: {"exact_match,none": 0.53, ...}}, ...}`.
   The primary metric of each task is the first of METRIC_PREFERENCES[benchmark] present, each metric tried
   with the filters of FILTER_PREFERENCES (default: none, flexible-extract, strict-match, then any other in
   name order). Values are fractions in [0, 1], returned ×100. Group entries (names under `group_subtasks` with
   children, or under `groups`) are ignored. ACPBench comes as per-domain tasks `acp_<domain>_<kind>`: the
   benchmark is their plain mean, over the mcq tasks when any, else bool, else gen (never mixed).

Keys that name no known benchmark are ignored and listed in `ScoreFile.ignored`. Errors are one-line
`FileNotFoundError`/`ValueError`s that start with the file's path.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftscope.eval.benchmarks import BENCHMARKS, acp_subtask, canonical_name

__all__ = ["ScoreFile", "load_scores", "read_scores", "METRIC_PREFERENCES", "FILTER_PREFERENCES", "SCORES_FORMAT"]

SCORES_FORMAT = "driftscope.scores/1"
_MATH = ("exact_match", "math_verify", "score")
# benchmark -> lm-eval metric names, most preferred first. Why these: math/AIME are scored by exact_match in
# lm-eval's tasks; GPQA's generative/CoT tasks give exact_match (its loglikelihood tasks acc_norm, then acc);
# HeadQA: plain acc (lm-eval's acc_norm second); CoQA: em, the paper's number (f1 second); IFEval:
# instruction-level strict accuracy; MC-TACO: acc (lm-eval also reports f1). "score" is the metric of driftscope's
# own ds_* tasks (eval/tasks/), which have no other; it comes last so a standard task's metric always wins. A benchmark
# not listed here is read by _OTHER_METRICS (its ds_* task gives score, or acc when scored by log-likelihood).
METRIC_PREFERENCES: dict[str, tuple[str, ...]] = {
    "aime24": _MATH, "aime25": _MATH, "math500": _MATH, "olympiadbench": _MATH,
    "gpqa_diamond": ("exact_match", "acc_norm", "acc", "score"),
    "livecodebench": ("pass@1", "pass_at_1", "acc", "exact_match", "score"),
    "acpbench": ("exact_match", "acc", "score"),
    "headqa": ("acc", "acc_norm", "score"),
    "coqa": ("em", "f1", "score"),
    "ifeval": ("inst_level_strict_acc", "prompt_level_strict_acc", "inst_level_loose_acc", "prompt_level_loose_acc",
               "score"),
    "halueval": ("acc", "accuracy", "exact_match", "em", "score"),
    "mctaco": ("acc", "f1", "score"),
}
_OTHER_METRICS = ("exact_match", "acc", "score")
_DEFAULT_FILTERS = ("none", "flexible-extract", "strict-match")
FILTER_PREFERENCES: dict[str, tuple[str, ...]] = {
    "gpqa_diamond": ("flexible-extract", "strict-match", "none"),  # the CoT answer is "(B)" in free text
    "acpbench": ("mcq-extract", "none"),
}
_ACP_KINDS = ("mcq", "bool", "gen")
_KEYS_SHOWN = 20


@dataclass(frozen=True)
class ScoreFile:
    """What one file held: `scores` (canonical name -> percent), the layout it was read as, per benchmark where
    its number came from (`sources`), and the keys left out with why (`ignored`)."""
    path: Path
    layout: str  # "plain" | "driftscope" | "lm-eval"
    scores: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)


def read_scores(path: str | Path, fraction: bool = False) -> dict[str, float]:
    """`{canonical benchmark: percent}` from a score file (see the module docstring for layouts and `fraction`)."""
    return load_scores(path, fraction).scores


def load_scores(path: str | Path, fraction: bool = False) -> ScoreFile:
    """The whole reading of a score file, with where each number came from and what was ignored."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    if isinstance(data.get("results"), dict):
        layout, items, ignored = "lm-eval", *_lm_eval_items(path, data)
    elif "scores" in data:
        fmt = data.get("format")
        if fmt is not None and fmt != SCORES_FORMAT:
            raise ValueError(f"{path}: format {fmt!r} is not {SCORES_FORMAT!r}, the scores.json layout read here")
        if not isinstance(data["scores"], dict):
            raise ValueError(f"{path}: \"scores\" must be an object of benchmark -> percent, "
                             f"got {type(data['scores']).__name__}")
        layout, items, ignored = "driftscope", *_plain_items(path, data["scores"], "scores.", False)
    else:
        layout, items, ignored = "plain", *_plain_items(path, data, "", fraction)
    scores, sources, unused = _assemble(path, items)
    ignored.update(unused)
    if not scores:
        seen = list(data["results"] if layout == "lm-eval" else data["scores"] if layout == "driftscope" else data)
        shown = ", ".join(map(str, seen[:_KEYS_SHOWN])) + (f", ... ({len(seen)} keys)" if len(seen) > _KEYS_SHOWN
                                                           else "")
        raise ValueError(f"{path}: no recognizable benchmark ({layout} layout); keys seen: {shown or 'none'}; "
                         f"known: {', '.join(BENCHMARKS)}")
    return ScoreFile(path=path, layout=layout, scores=scores, sources=sources, ignored=ignored)


# ---- reading -----------------------------------------------------------------------------------------------------
def _load_json(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such scores file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a JSON scores file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}), expected a JSON scores file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None


def _number(path: Path, where: str, value: Any, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: {where} is not a number: {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{path}: {where} = {value!r} is not {what} in [{lo:g}, {hi:g}]")
    return float(value)


def _plain_items(path: Path, mapping: Mapping, prefix: str, fraction: bool):
    """([(key, canonical or acp marker, percent, source)], ignored) from a flat {name: score} mapping."""
    items, ignored = [], {}
    for key, value in mapping.items():
        target = _target(key)
        if target is None:
            ignored[key] = "not a known benchmark"
        elif value is None:
            ignored[key] = "null score (not scored)"
        else:
            hi, what = (1.0, "a fraction") if fraction else (100.0, "a percentage")
            items.append((key, target, 100.0 / hi * _number(path, f"{prefix}{key}", value, 0.0, hi, what), key))
    return items, ignored


def _target(key: str) -> str | tuple[str, str] | None:
    """The canonical benchmark a key names, ("acpbench", kind) for an ACPBench per-domain task, else None."""
    kind = acp_subtask(key)
    return ("acpbench", kind) if kind else canonical_name(key)


def _group_names(data: Mapping) -> set[str]:
    groups = set(data.get("groups") or {}) if isinstance(data.get("groups"), dict) else set()
    subtasks = data.get("group_subtasks")
    if isinstance(subtasks, dict):
        groups |= {name for name, children in subtasks.items() if children}
    return groups


def _lm_eval_items(path: Path, data: Mapping):
    items, ignored = [], {}
    groups = _group_names(data)
    for task, metrics in data["results"].items():
        target = _target(task)
        if task in groups:
            ignored[task] = "group entry (its subtasks are read instead)"
        elif target is None:
            ignored[task] = "not a known benchmark"
        elif not isinstance(metrics, dict):
            raise ValueError(f"{path}: results.{task} must be an object of metrics, got {type(metrics).__name__}")
        else:
            bench = target if isinstance(target, str) else target[0]
            key = _primary_metric(path, task, bench, metrics)
            value = _number(path, f"results.{task}.{key}", metrics[key], 0.0, 1.0, "a fraction")
            items.append((task, target, 100.0 * value, f"{task}: {key}"))
    return items, ignored


def _split_metric(key: str) -> tuple[str, str] | None:
    """("exact_match", "flexible-extract") for "exact_match,flexible-extract"; None for stderr and non-metric keys."""
    metric, _, filt = key.partition(",")
    if metric.endswith("_stderr") or metric in ("alias", "name", "samples", "sample_len"):
        return None
    return metric, filt or "none"


def _primary_metric(path: Path, task: str, bench: str, metrics: Mapping) -> str:
    by_metric: dict[str, dict[str, str]] = {}
    for key in metrics:
        split = _split_metric(str(key))
        if split:
            by_metric.setdefault(split[0], {})[split[1]] = key
    filters = FILTER_PREFERENCES.get(bench, _DEFAULT_FILTERS)
    preferred = METRIC_PREFERENCES.get(bench, _OTHER_METRICS)
    for metric in preferred:
        present = by_metric.get(metric, {})
        for filt in (*filters, *sorted(set(present) - set(filters))):
            if filt in present:
                return present[filt]
    raise ValueError(f"{path}: results.{task} has none of the metrics {', '.join(preferred)} "
                     f"(has: {', '.join(map(str, metrics)) or 'nothing'})")


# ---- assembling ------------------------------------------------------------------------------------------------
def _assemble(path: Path, items: list) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """(scores, sources, unused ACPBench tasks) from (key, target, percent, source) items: a benchmark named twice
    is an error; ACPBench tasks of one kind are averaged."""
    scores: dict[str, float] = {}
    sources: dict[str, str] = {}
    first_key: dict[str, str] = {}
    acp: dict[str, list[tuple[str, float, str]]] = {}
    for key, target, value, source in items:
        if isinstance(target, tuple):
            acp.setdefault(target[1], []).append((key, value, source))
            continue
        if target in first_key:
            raise ValueError(f"{path}: both {first_key[target]!r} and {key!r} name {target}; keep one")
        first_key[target], scores[target], sources[target] = key, value, source
    if acp:
        if "acpbench" in scores:
            raise ValueError(f"{path}: both {first_key['acpbench']!r} and ACPBench subtasks "
                             f"({acp[next(iter(acp))][0][0]!r}, ...) give acpbench; keep one")
        kind = next(k for k in _ACP_KINDS if k in acp)
        parts = acp[kind]
        scores["acpbench"] = math.fsum(v for _, v, _ in parts) / len(parts)
        sources["acpbench"] = f"mean of {len(parts)} ACPBench {kind} tasks: " + "; ".join(s for _, _, s in parts)
    unused = {key: f"ACPBench {k} task; acpbench is the mean of the {kind} tasks"
              for k, parts in acp.items() if k != kind for key, _, _ in parts}
    return ({b: scores[b] for b in BENCHMARKS if b in scores}, {b: sources[b] for b in BENCHMARKS if b in sources},
            unused)
