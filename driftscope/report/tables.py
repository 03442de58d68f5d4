"""Per-token-id table of a drift run on disk: `write_token_table` writes parquet when pyarrow imports, else JSONL;
`read_token_table` reads either back to the same rows. `visible_text` is how token text is shown to a reader.
`example_rows` turns summary.json's "examples" into the rows of the examples table (EXAMPLE_COLUMNS).

NaN and inf are written as null (None), as everywhere in a summary. Column order: TOKEN_COLUMNS, then extra keys.
"""
from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

from driftscope.util import atomic_write, read_jsonl, strict_json, write_jsonl


__all__ = ["TOKEN_COLUMNS", "EXAMPLE_COLUMNS", "example_rows", "write_token_table", "read_token_table", "visible_text",
           "escape_code_point"]

# column -> pyarrow type name; "text" is null when the run had no decoder, mean_shift is null for NaN
TOKEN_COLUMNS: dict[str, str] = {
    "model": "string", "task": "string", "id": "int64", "text": "string", "count": "int64",
    "count_shifted": "int64", "frac_shifted": "float64", "mean_shift": "float64", "mean_abs_shift": "float64",
}

# one row per stored top-KL token (--examples): the target is the context's middle id; "T[]" is a list of T
EXAMPLE_COLUMNS: dict[str, str] = {
    "model": "string", "task": "string", "sample_id": "int64", "position": "int64", "kl": "float64",
    "target_id": "int64", "target_text": "string", "context_ids": "int64[]", "context_texts": "string[]",
    **{f"{who}_top_{k}": t for who in ("base", "tuned") for k, t in (("ids", "int64[]"), ("p", "float64[]"),
                                                                     ("texts", "string[]"))},
}


def example_rows(summary: dict) -> list[dict]:
    """summary.json's examples -> EXAMPLE_COLUMNS rows: each (model, task)'s "top_tokens" in the store's order (KL
    descending); the texts are None when the run had no decoder."""
    rows = []
    for model, m in summary["models"].items():
        for task, t in m["tasks"].items():
            ex = t.get("examples") or {}
            for r in ex.get("top_tokens") or []:
                texts = r.get("context_texts")
                row = {"model": model, "task": task, "sample_id": r["sample_id"], "position": r["position"],
                       "kl": r["kl"], "target_id": r["context_ids"][ex["window"]],
                       "target_text": texts[ex["window"]] if texts else None, "context_ids": r["context_ids"],
                       "context_texts": texts}
                for who in ("base", "tuned"):
                    top = r[f"{who}_top"]
                    row |= {f"{who}_top_ids": [e["id"] for e in top], f"{who}_top_p": [e["p"] for e in top],
                            f"{who}_top_texts": [e["text"] for e in top] if all("text" in e for e in top) else None}
                rows.append(row)
    return rows


_SHOWN_AS = {"\n": "↵", "\t": "⇥"}
_HIDDEN_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")  # controls, format, surrogates, private, unassigned


def visible_text(text: str | None) -> str:
    """Token text with nothing invisible: newline → ↵, tab → ⇥, other control/format/unassigned code points
    → \\xNN / \\uXXXX; None → "∅". Not HTML-escaped (escape after)."""
    if text is None:
        return "∅"
    out = []
    for ch in text:
        if ch in _SHOWN_AS:
            out.append(_SHOWN_AS[ch])
        elif unicodedata.category(ch) in _HIDDEN_CATEGORIES:
            out.append(escape_code_point(ord(ch)))
        else:
            out.append(ch)
    return "".join(out)


def escape_code_point(cp: int) -> str:
    """Python-style escape of one code point: \\xNN, \\uXXXX or \\UXXXXXXXX."""
    return f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"


# ---- writing --------------------------------------------------------------------------------------------------
def write_token_table(path_without_suffix: Path, rows: list[dict], schema: dict[str, str] = TOKEN_COLUMNS) -> Path:
    """Write `rows` (dicts with the `schema` keys, TOKEN_COLUMNS or EXAMPLE_COLUMNS; extra keys become extra
    columns) to `<path_without_suffix>.parquet` if pyarrow is importable, else `.jsonl`; return the path written.

    The suffix is appended to the name (a dotted name such as `qwen2.5_coqa` keeps its dots). Parent folders
    are created; the file appears atomically (temp file + rename). Text that is not valid UTF-8 (lone
    surrogates) cannot go into parquet: the table is then written as JSONL, with a warning that says why.
    """
    path_without_suffix = Path(path_without_suffix)
    columns = _columns(rows, schema)
    clean = [{c: strict_json(row.get(c)) for c in columns} for row in rows]
    pa = _pyarrow()
    bad = _first_non_utf8(clean)
    if pa is not None and bad is not None:
        warnings.warn(f"token table {path_without_suffix}: row {bad[0]} column {bad[1]!r} is not valid UTF-8 "
                      f"(lone surrogate), which parquet cannot store; writing JSONL instead", stacklevel=2)
    if pa is not None and bad is None:
        return _write_parquet(path_without_suffix.with_name(path_without_suffix.name + ".parquet"), clean, columns, pa,
                              schema)
    # ensure_ascii: every string (even a lone surrogate) round-trips, and the file is plain ASCII
    return write_jsonl(path_without_suffix.with_name(path_without_suffix.name + ".jsonl"), clean, ensure_ascii=True)


def _columns(rows: Sequence[dict], schema: dict[str, str]) -> list[str]:
    """`schema`'s columns in order, then extra keys in first-seen order; a row missing a required key (all but
    "text") is an error."""
    required = [c for c in schema if c != "text"]
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise ValueError(f"token table row {i} (id={row.get('id')!r}) lacks {missing}; "
                             f"expected keys {list(schema)}")
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in schema))
    return list(schema) + extra


def _first_non_utf8(rows: Sequence[dict]) -> tuple[int, str] | None:
    for i, row in enumerate(rows):
        for k, v in row.items():
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return i, k
    return None


def _pyarrow():
    """The pyarrow module, or None when it is not installed (JSONL is written then)."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (submodule must import too)
    except ImportError:
        return None
    return pyarrow


def _write_parquet(path: Path, rows: list[dict], columns: list[str], pa, schema: dict[str, str]) -> Path:
    def typ(t: str):
        return pa.list_(typ(t[:-2])) if t.endswith("[]") else getattr(pa, t)()
    arrays = {}
    for c in columns:
        values = [row[c] for row in rows]
        arrays[c] = pa.array(values, type=typ(schema[c])) if c in schema else pa.array(values)
    table = pa.table(arrays)

    def write(tmp: Path) -> None:
        import pyarrow.parquet as pq
        pq.write_table(table, tmp)
    return atomic_write(path, write)


# ---- reading --------------------------------------------------------------------------------------------------
def read_token_table(path: Path) -> list[dict]:
    """Rows of a table written by `write_token_table` (by suffix: .parquet or .jsonl), as a list of dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token table {path} does not exist")
    if path.suffix == ".jsonl":
        return [row for _, row in read_jsonl(path, "token table")]
    if path.suffix == ".parquet":
        if _pyarrow() is None:
            raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow)")
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    raise ValueError(f"token table {path}: expected a .parquet or .jsonl suffix, got {path.suffix!r}")
