"""Writes an eval run's files: scores.json (the `driftscope.scores/1` layout of eval.scores), per-sample logs."""
from __future__ import annotations

from pathlib import Path

from driftscope.errors import InputError
from driftscope.util import read_json, write_json, write_jsonl

__all__ = ["FORMAT", "out_folder", "write_json", "write_jsonl", "write_scores"]

FORMAT = "driftscope.scores/1"


def out_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path` as an output folder (created when missing), checked before any work: InputError naming `flag` when it,
    or a folder above it, is a file."""
    path = Path(path)
    if (file := next((p for p in (path, *path.parents) if p.is_file()), None)) is not None:
        what = "is a file" if file == path else f"cannot be made: {file} is a file"
        raise InputError(f"{flag} {path} {what}; expected a folder (created when missing)")
    return path


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
