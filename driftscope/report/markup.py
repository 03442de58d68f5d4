"""The small HTML pieces every report page shares: escaping and number formatting, tables, <details>, token cells.
Every data string goes through `esc`."""
from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from driftscope.report.tables import visible_text

__all__ = ["esc", "fmt", "dig", "html_table", "details", "token_cell"]


# ---- escaping and formatting -----------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """Any data value as HTML text: str(value) (None: ∅), invisible characters made visible, then HTML-escaped."""
    return html.escape(visible_text(value if isinstance(value, str) or value is None else str(value)), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell: ints and floats >= 10**digits with thousands separators, other floats to
    `digits` significant digits, None (NaN in the summary) as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if 10 ** digits <= abs(value) < 1e15 else f"{value:.{digits}g}"
    return esc(value)


def dig(d: Mapping | None, *path: str) -> Any:
    """d[path[0]][path[1]]..., None where any level is missing or None."""
    for key in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(key)
    return d


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A table of already-escaped cells; columns from `numeric_from` on are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if j >= numeric_from else f"<td>{c}</td>"
                         for j, c in enumerate(row)) + "</tr>\n"
        for row in rows)
    return f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table></div>\n'


def details(summary: str, body: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{summary}</summary>\n{body}</details>\n"


def token_cell(text: str | None) -> str:
    """Token text in a bordered pre-formatted box, so leading/trailing spaces show; empty text said in words."""
    return '<span class="muted">(empty)</span>' if text == "" else f'<code class="tok">{esc(text)}</code>'
