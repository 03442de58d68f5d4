"""Token table: parquet and JSONL round trips keep every row (any unicode, None text, NaN -> None), the suffix is
appended to dotted names, bad input is named; visible_text makes invisible characters visible."""
from __future__ import annotations

import math

import pytest
from report_helpers import block_import

from driftscope.report.tables import TOKEN_COLUMNS, read_token_table, visible_text, write_token_table

TEXTS = ["<script>alert(1)</script>", "&amp;", "$x$", "\n\n", " the", "中文", "\x00\x1b\x7f", "é🙂👨‍👩‍👧",
         "\u202eRTL", "e\u0301", "\ufeff", "", None, "\\n", "\u2028", "\U0010ffff"]


def rows(model: str = "rl", task: str = "coqa") -> list[dict]:
    out = []
    for i, text in enumerate(TEXTS):
        out.append({"id": 151_000 + i, "text": text, "count": 10 + i, "count_shifted": i, "frac_shifted": i / (10 + i),
                    "mean_shift": float("nan") if i == 3 else -0.5 * i, "mean_abs_shift": 0.5 * i,
                    "model": model, "task": task})
    return out


def expected(rs: list[dict]) -> list[dict]:
    """What comes back: columns in TOKEN_COLUMNS order, NaN as None."""
    return [{c: (None if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in TOKEN_COLUMNS} for r in rs]


def test_jsonl_round_trip_without_pyarrow(tmp_path, monkeypatch):
    block_import(monkeypatch, "pyarrow")
    path = write_token_table(tmp_path / "tokens" / "rl_qwen2.5_coqa", rows())
    assert path == tmp_path / "tokens" / "rl_qwen2.5_coqa.jsonl"
    assert read_token_table(path) == expected(rows())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temp files left behind"


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow not installed: token tables are written as JSONL")
    import pyarrow.parquet as pq
    path = write_token_table(tmp_path / "rl_qwen2.5_coqa", rows())
    assert path.name == "rl_qwen2.5_coqa.parquet"
    assert read_token_table(path) == expected(rows())
    schema = pq.read_schema(path)
    assert schema.names == list(TOKEN_COLUMNS)
    assert [str(schema.field(c).type) for c in ("id", "text", "mean_shift")] == ["int64", "string", "double"]


def test_parquet_empty_table_keeps_schema(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow not installed")
    import pyarrow.parquet as pq
    path = write_token_table(tmp_path / "empty", [])
    assert read_token_table(path) == [] and pq.read_schema(path).names == list(TOKEN_COLUMNS)


def test_extra_columns_kept(tmp_path, monkeypatch):
    block_import(monkeypatch, "pyarrow")
    rs = rows()[:2]
    rs[1]["rank"] = 7
    back = read_token_table(write_token_table(tmp_path / "t", rs))
    assert list(back[0]) == list(TOKEN_COLUMNS) + ["rank"] and back[0]["rank"] is None and back[1]["rank"] == 7


def test_lone_surrogate_falls_back_to_jsonl(tmp_path):
    pytest.importorskip("pyarrow", reason="pyarrow not installed: nothing to fall back from")
    rs = rows()[:1]
    rs[0]["text"] = "ab\ud800"
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        path = write_token_table(tmp_path / "t", rs)
    assert path.suffix == ".jsonl" and read_token_table(path)[0]["text"] == "ab\ud800"


def test_missing_column_is_named(tmp_path):
    rs = rows()[:2]
    del rs[1]["count_shifted"]
    with pytest.raises(ValueError, match=r"row 1 \(id=151001\) lacks \['count_shifted'\]"):
        write_token_table(tmp_path / "t", rs)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_token_table(tmp_path / "absent.jsonl")
    (tmp_path / "t.csv").write_text("x")
    with pytest.raises(ValueError, match="'.csv'"):
        read_token_table(tmp_path / "t.csv")


@pytest.mark.parametrize(("text", "shown"), [
    ("\n", "↵"), ("a\tb", "a⇥b"), ("\r", "\\x0d"), ("\x00", "\\x00"), ("\u200b", "\\u200b"), ("\u2028", "\\u2028"),
    ("\U000e0001", "\\U000e0001"), (" the ", " the "), ("中文é🙂", "中文é🙂"), (None, "∅"), ("<&>", "<&>"),
], ids=["newline", "tab", "cr", "nul", "zero-width", "line-sep", "tag-char", "spaces", "printable", "none", "html"])
def test_visible_text(text, shown):
    assert visible_text(text) == shown
