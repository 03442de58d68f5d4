"""Writes an eval run's files: scores.json (the `driftscope.scores/1` layout of eval.scores), per-sample logs."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

FORMAT = "driftscope.scores/1"


def _strict(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_strict(obj), indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(_strict(r), ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_scores(out: Path, result: dict, rows: dict[str, list[dict]] | None = None, model: str | None = None) -> Path:
    """OUT/scores.json (merged with an existing one: other benchmarks' scores are kept) and OUT/samples/<b>.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scores.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    scores = {**old.get("scores", {}), **result["scores"]}
    details = {**old.get("details", {}), **result.get("details", {})}
    doc = {"format": FORMAT, "model": model or old.get("model"), "scores": scores, "details": details}
    for name, r in (rows or {}).items():
        write_jsonl(out / "samples" / f"{name}.jsonl", r)
    return write_json(path, doc)
