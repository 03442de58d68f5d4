"""Writes an eval run's files: scores.json (the `driftscope.scores/1` layout of eval.scores), per-sample logs."""
from __future__ import annotations

from pathlib import Path

from driftscope.util import read_json, write_json, write_jsonl

__all__ = ["FORMAT", "write_json", "write_jsonl", "write_scores"]

FORMAT = "driftscope.scores/1"


def write_scores(out: Path, result: dict, rows: dict[str, list[dict]] | None = None, model: str | None = None) -> Path:
    """OUT/scores.json (merged with an existing one: other benchmarks' scores are kept) and OUT/samples/<b>.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scores.json"
    old = read_json(path, "scores file", dict) if path.exists() else {}
    scores = {**old.get("scores", {}), **result["scores"]}
    details = {**old.get("details", {}), **result.get("details", {})}
    doc = {"format": FORMAT, "model": model or old.get("model"), "scores": scores, "details": details}
    for name, r in (rows or {}).items():
        write_jsonl(out / "samples" / f"{name}.jsonl", r)
    return write_json(path, doc)
