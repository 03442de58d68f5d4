"""Writes a drift run's files: summary.json, the shifted-token table, the examples table (--examples),
pca_shift.json (paper schema), report.html."""
from __future__ import annotations

import json
from pathlib import Path

from driftscope.util import atomic_write_text, write_jsonl


def _write_json(path: Path, obj) -> Path:
    """Indented UTF-8 JSON without a final newline; ValueError on NaN (the summary is strict already)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False))


def pca_shift_entries(summary: dict) -> list[dict]:
    """The paper's pca_shift.json: [{"benchmark": "<task>_PCA_Shift", "model": ..., "data": records}]."""
    out = []
    for model, m in summary["models"].items():
        for task, t in m["tasks"].items():
            if t.get("pca"):
                out.append({"benchmark": f"{task}_PCA_Shift", "model": model, "mode": t["pca"]["mode"],
                            "centroid_distance": t["pca"]["centroid_distance"], "data": t["pca"]["records"]})
    return out


def write_outputs(out: Path, summary: dict, token_rows: list[dict], report: bool = True) -> dict[str, Path]:
    from driftscope.report import write_report, write_token_table
    from driftscope.report.tables import EXAMPLE_COLUMNS, example_rows

    files = {"summary": _write_json(out / "summary.json", summary)}
    files["tokens"] = write_token_table(out / "tokens", token_rows)
    examples = example_rows(summary)
    if examples:  # one row per stored top-KL token of every (model, task)
        files["examples"] = write_token_table(out / "examples", examples, EXAMPLE_COLUMNS)
    else:  # an examples table of an earlier run would describe other numbers
        for suffix in (".parquet", ".jsonl"):
            (out / f"examples{suffix}").unlink(missing_ok=True)
    entries = pca_shift_entries(summary)
    if entries:
        files["pca_shift"] = _write_json(out / "pca_shift.json", entries)
    if report:
        files["report"] = write_report(out, summary)
    else:  # a report.html of an earlier run would describe other numbers
        (out / "report.html").unlink(missing_ok=True)
    return files


def write_responses(out: Path, responses: dict[str, dict[str, list[dict]]]) -> dict[str, Path]:
    """Generate mode: responses/<model>/<task>.jsonl, one record per prompt ({input, output, output_token_ids, ...})."""
    return {f"responses/{model}/{task}": write_jsonl(out / "responses" / model / f"{task}.jsonl", rows)
            for model, tasks in responses.items() for task, rows in tasks.items()}
