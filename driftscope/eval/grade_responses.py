"""`driftscope eval --benchmark NAME --responses FILE`: grade existing responses without a model.

Records are JSON objects with the response in `output` (or `response`, `completion`, `text`). They are matched to
the benchmark's docs by an id field when they carry one (`doc_index`, `doc_id`, `id`, `key`, `question_id`), else
by position: record i is doc i, or, with k records per doc, records i·k … i·k+k−1 (the samples of doc i). When a
record has the paper's `input` (the rendered prompt), the doc's own prompt text must occur in it, so a file in
another order is refused at its first wrong line instead of being graded against the wrong answers.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from driftscope.eval import benchmarks as B
from driftscope.util import read_jsonl

__all__ = ["grade_responses", "match_records"]

RESPONSE_FIELDS = ("output", "response", "completion", "text")
ID_FIELDS = ("doc_index", "doc_id", "id", "key", "question_id")


def _read(path: Path) -> list[tuple[int, dict]]:
    out = read_jsonl(path, "responses file")
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def _response(path: Path, line_no: int, obj: dict) -> str:
    for f in RESPONSE_FIELDS:
        if isinstance(obj.get(f), str):
            return obj[f]
    raise ValueError(f"{path}:{line_no}: no response field (expected one of {', '.join(RESPONSE_FIELDS)})")


def _anchor(bench: B.Benchmark, doc: dict) -> str:
    """A piece of the doc's prompt that any rendering of it contains (the prompt's longest line, cut)."""
    lines = [ln.strip() for ln in bench.prompt(doc).splitlines() if ln.strip()]
    return max(lines, key=len)[:80] if lines else ""


def match_records(bench: B.Benchmark, docs: Sequence[dict], records: list[tuple[int, dict]], path: Path
                  ) -> list[tuple[int, list[tuple[int, str]]]]:
    """[(doc index, [(line, response), ...])] in doc order; every record used exactly once."""
    id_field = next((f for f in ID_FIELDS if all(f in obj for _, obj in records)), None)
    groups: dict[int, list[tuple[int, str]]] = {}
    if id_field is not None:
        doc_field = "doc_index" if id_field == "doc_index" else next(
            (f for f in (id_field, "id", "key", "question_id", "unique_id") if docs and f in docs[0]), None)
        index = {i: i for i in range(len(docs))} if doc_field == "doc_index" else \
            {str(d.get(doc_field)): i for i, d in enumerate(docs)} if doc_field else {}
        for line_no, obj in records:
            key = obj[id_field] if doc_field == "doc_index" else str(obj[id_field])
            if key not in index:
                raise ValueError(f"{path}:{line_no}: {id_field}={obj[id_field]!r} is not a doc of {bench.name}")
            groups.setdefault(index[key], []).append((line_no, _response(path, line_no, obj)))
    else:
        n, m = len(records), len(docs)
        if n % m and not (n <= m):
            raise ValueError(f"{path}: {n} records for {m} {bench.name} docs; expected {m} (one per doc), a multiple "
                             f"of it (k samples per doc), or records with one of the id fields {', '.join(ID_FIELDS)}")
        k = n // m if n >= m else 1
        for r, (line_no, obj) in enumerate(records):
            groups.setdefault(r // k, []).append((line_no, _response(path, line_no, obj)))
    for i, items in groups.items():
        line_no = items[0][0]
        obj = next(o for ln, o in records if ln == line_no)
        anchor = _anchor(bench, docs[i])
        if isinstance(obj.get("input"), str) and anchor and anchor not in obj["input"]:
            raise ValueError(f"{path}:{line_no}: the record's input does not hold {bench.name} doc {i}'s prompt "
                             f"({anchor[:40]!r}...); the file is in another order or of another benchmark")
    return sorted(groups.items())


def grade_responses(benchmark: str, responses: str | Path, out: str | Path | None = None, *,
                    data_dir: str | Path | None = None) -> dict[str, Any]:
    """Grade a responses file; returns (and writes to OUT/scores.json, OUT/graded.jsonl) the scores."""
    from driftscope.eval.outputs import write_scores

    bench = B.get(benchmark)
    if bench.kind != "generate":
        raise ValueError(f"{bench.name} is scored by log-likelihood, not from responses; run driftscope eval --model")
    path = Path(responses)
    records = _read(path)
    docs = B.load_docs(bench.name, data_dir)
    matched = match_records(bench, docs, records, path)
    rows, per_doc = [], []
    for i, items in matched:
        grades = [bench.grade(text, docs[i]) for _, text in items]
        flat = [x for g in grades for x in (g if isinstance(g, list) else [g])] if any(
            isinstance(g, list) for g in grades) else [sum(grades) / len(grades)]
        per_doc.append(flat)
        rows.append({"doc_index": i, "lines": [ln for ln, _ in items], "grades": grades})
    score = B.score_of(per_doc)
    details = {"metric": bench.metric, "docs": len(matched), "of_docs": len(docs), "samples": len(records),
               "responses": str(path)}
    result = {"scores": {bench.name: score}, "details": {bench.name: details}}
    if out is not None:
        write_scores(Path(out), result, rows={bench.name: rows})
    return result
