"""Outputs of a drift run: `write_report` (one self-contained report.html) and `write_token_table` (parquet or
JSONL per-token-id table). Importing this package never imports matplotlib or pyarrow."""
from __future__ import annotations

from driftscope.report.html import render_report, write_report
from driftscope.report.tables import read_token_table, visible_text, write_token_table

__all__ = ["write_report", "render_report", "write_token_table", "read_token_table", "visible_text"]
