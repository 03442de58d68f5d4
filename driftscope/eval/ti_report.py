"""Transferability Index outputs: the paper's Table 1 as text (`format_table`), `ti.json` (`write_json`) and the
paper's Figure 2, TI_other against TI_non per tuned model, as `ti.png` plus a self-contained `ti.html`
(`write_scatter`). Without matplotlib the HTML is written without the figure and says why. Writes are atomic.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from driftscope.eval.benchmarks import BENCHMARKS
from driftscope.eval.ti import GROUPS, TIResult
from driftscope.report import plots
from driftscope.report.html import CSS, esc, html_figure, html_table
from driftscope.util import atomic_write

__all__ = ["table_cells", "format_table", "ti_json", "write_json", "scatter_png", "render_html", "write_scatter"]

DASH = "—"
_GROUP_TITLES = {"math": "math", "other": "other reasoning", "non": "non-reasoning"}
Scores = Mapping[str, float]
_TI_CSS = "table{font-size:.8em}th,td{padding:.2em .35em}"  # Table 1's 19 columns fit 1150 px; narrower: it scrolls
_CAPTION = ("One point per tuned model. x: TI_other, y: TI_non, each 100 × the model's gain over the base on that "
            "group / its gain on math: 100 = the math gain carried over in full, 0 = no gain, below 0 = worse than "
            "the base (when the math gain is positive). Upper right: math gains carry over to both groups; lower "
            "right: to other reasoning only.")


# ---- Table 1 -----------------------------------------------------------------------------------------------------
def _cell(v: float | None) -> str:
    return DASH if v is None or math.isnan(v) else f"{v:.1f}"


def _group_mean(scores: Scores, group: str) -> float | None:
    """Plain mean of the group's four scores; None unless all four are present."""
    values = [scores.get(b) for b in GROUPS[group]]
    return None if any(v is None for v in values) else math.fsum(values) / len(values)


def table_cells(base_name: str, base_scores: Scores, tuned: Mapping[str, Scores],
                results: Mapping[str, TIResult]) -> tuple[list[list[str]], list[list[str]]]:
    """(header blocks, rows): blocks are [model], then per group its benchmarks and "avg", then [TI_other,
    TI_non]; each row holds the same blocks' cells flattened. Missing values are "—"; the base has no TI."""
    blocks = [["model"]] + [[BENCHMARKS[b].display for b in GROUPS[g]] + [f"{g} avg"] for g in GROUPS] \
        + [["TI_other", "TI_non"]]
    rows = []
    for k, (name, scores) in enumerate([(base_name, base_scores), *tuned.items()]):
        row = [name]
        for g in GROUPS:
            row += [_cell(scores.get(b)) for b in GROUPS[g]] + [_cell(_group_mean(scores, g))]
        r = results.get(name) if k > 0 else None
        row += [_cell(r.ti_other), _cell(r.ti_non)] if r is not None else [DASH, DASH]
        rows.append(row)
    return blocks, rows


def format_table(base_name: str, base_scores: Scores, tuned: Mapping[str, Scores],
                 results: Mapping[str, TIResult]) -> str:
    """Table 1 as aligned text: one row per model (base first), the 12 benchmarks grouped math | other | non with
    each group's mean, then TI_other and TI_non (1 decimal; "—" where missing or undefined)."""
    blocks, rows = table_cells(base_name, base_scores, tuned, results)
    header = [h for block in blocks for h in block]
    widths = [max(len(header[j]), *(len(r[j]) for r in rows)) for j in range(len(header))]
    bounds, start = [], 0
    for block in blocks:
        bounds.append(range(start, start + len(block)))
        start += len(block)

    def line(cells: list[str]) -> str:  # the first block (the model's name) left-justified, the numbers right
        return " | ".join(" ".join((str.ljust if k == 0 else str.rjust)(cells[j], widths[j]) for j in cols)
                          for k, cols in enumerate(bounds)).rstrip()

    rule = "-+-".join("-" * (sum(widths[j] for j in cols) + len(cols) - 1) for cols in bounds)
    method = next(iter(results.values())).method if results else None
    title = f"Transferability Index ({method})" if method else "Transferability Index"
    return "\n".join([title, line(header), rule, *(line(r) for r in rows)]) + "\n"


# ---- ti.json -----------------------------------------------------------------------------------------------------
def ti_json(base_name: str, base_scores: Scores, tuned: Mapping[str, Scores], results: Mapping[str, TIResult],
            sources: Mapping[str, str] | None = None) -> dict:
    """The JSON document: method and σ of the run, the groups, the base's and each tuned model's scores with its
    TIResult (NaN as null, reasons beside). `sources`: model name -> the file its scores came from."""
    first = next(iter(results.values()), None)
    sources = sources or {}

    def model(name: str, scores: Scores) -> dict:
        entry = {"scores": dict(scores), "group_means": {g: _group_mean(scores, g) for g in GROUPS}}
        if name in sources:
            entry["file"] = str(sources[name])
        return entry

    return {
        "format": "driftscope.ti/1",
        "method": first.method if first else None,
        "sigma": first.sigma if first else None,
        "sigma_source": first.sigma_source if first else None,
        "groups": {g: list(bs) for g, bs in GROUPS.items()},
        "base": {"name": base_name, **model(base_name, base_scores)},
        "models": {name: {**model(name, tuned[name]), **results[name].to_dict()} for name in tuned},
    }


def write_json(path: str | Path, base_name: str, base_scores: Scores, tuned: Mapping[str, Scores],
               results: Mapping[str, TIResult], sources: Mapping[str, str] | None = None) -> Path:
    """Write `ti_json(...)` to `path` atomically (strict JSON: no NaN) and return the path."""
    text = json.dumps(ti_json(base_name, base_scores, tuned, results, sources), indent=2, ensure_ascii=False,
                      allow_nan=False) + "\n"
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---- Figure 2 ----------------------------------------------------------------------------------------------------
def _points(results: Mapping[str, TIResult]) -> dict[str, tuple[float, float]]:
    return {n: (r.ti_other, r.ti_non) for n, r in results.items()
            if not (math.isnan(r.ti_other) or math.isnan(r.ti_non))}


def scatter_png(results: Mapping[str, TIResult], title: str = "") -> bytes:
    """The paper's Fig. 2: one labelled point per tuned model at (TI_other, TI_non), axes through 0 (quadrants:
    gains transfer to both / one / neither). Models with an undefined TI are left out and named below the axes."""
    pts = _points(results)
    fig, (ax,) = plots._figure(6.4, 5.0)
    xs, ys = [p[0] for p in pts.values()] + [0.0], [p[1] for p in pts.values()] + [0.0]
    for values, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        lo, hi = min(values), max(values)
        pad = 0.12 * (hi - lo) or 10.0
        setter(lo - pad, hi + pad)
    ax.axhline(0.0, color="black", lw=0.9, zorder=1)
    ax.axvline(0.0, color="black", lw=0.9, zorder=1)
    for j, (name, (x, y)) in enumerate(pts.items()):
        ax.scatter([x], [y], s=60, color=f"C{j % 10}", edgecolors="black", linewidths=0.5, zorder=3)
        ax.annotate(plots.mpl_text(name, max_chars=32), (x, y), xytext=(6, 6), textcoords="offset points",
                    fontsize=9, zorder=4)
    ax.set_xlabel("TI_other (other reasoning; 100 = as much as math)")
    ax.set_ylabel("TI_non (non-reasoning)")
    ax.grid(alpha=0.3)
    method = next(iter(results.values())).method if results else ""
    ax.set_title(f"Transferability Index ({method})", fontsize=10)
    left_out = [n for n in results if n not in pts]
    if left_out:
        ax.text(0.01, 0.01, plots.mpl_text("TI undefined (not drawn): " + ", ".join(left_out), max_chars=120),
                transform=ax.transAxes, fontsize=7, color="#a00000")
    if not pts:
        ax.text(0.5, 0.5, "no model has both TI values", transform=ax.transAxes, ha="center", fontsize=10)
    plots._title(fig, title)
    return plots._png(fig)


def render_html(base_name: str, base_scores: Scores, tuned: Mapping[str, Scores],
                results: Mapping[str, TIResult], png: bytes | None, note: str | None = None) -> str:
    """The page: the figure (a base64 PNG, or `note` saying why there is none), Table 1, σ and every NaN's reason;
    inline CSS, no script, no external resource, every data string escaped."""
    blocks, rows = table_cells(base_name, base_scores, tuned, results)
    header = [esc(h) for block in blocks for h in block]
    first = next(iter(results.values()), None)
    parts = [f"<h1>Transferability Index</h1>\n<p>base: <b>{esc(base_name)}</b>; method: "
             f"<b>{esc(first.method if first else '—')}</b>"]
    if first is not None and first.sigma is not None:
        sig = ", ".join(f"σ_{g} = {v:.6g}" for g, v in first.sigma.items())
        parts.append(f"; {esc(sig)} ({esc(first.sigma_source)})")
    parts.append("</p>\n")
    parts.append(html_figure(png, "TI_other against TI_non per tuned model", _CAPTION) if png is not None
                 else f'<p class="note">{esc(note or "no figure")}</p>\n')
    parts.append("<h2>Scores (percent) and TI</h2>\n")
    parts.append(html_table(header, [[esc(c) for c in r] for r in rows]))
    groups = "; ".join(f"{_GROUP_TITLES[g]}: {', '.join(BENCHMARKS[b].display for b in bs)}"
                       for g, bs in GROUPS.items())
    parts.append(f'<p class="muted">groups — {esc(groups)}</p>\n')
    undefined = [(n, k, why) for n, r in results.items() for k, why in r.reasons.items()]
    if undefined:
        parts.append("<h2>Undefined values</h2>\n")
        parts.append(html_table(["model", "value", "reason"], [[esc(n), esc(k), esc(w)] for n, k, w in undefined],
                            numeric_from=3))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<title>driftscope TI: {esc(base_name)}</title>\n<style>{CSS}{_TI_CSS}</style>\n</head><body>\n"
            + "".join(parts) + "</body></html>\n")


def write_scatter(out_dir: str | Path, base_name: str, base_scores: Scores, tuned: Mapping[str, Scores],
                  results: Mapping[str, TIResult], title: str = "") -> dict[str, Path | str]:
    """Write out_dir/ti.png (when matplotlib imports) and out_dir/ti.html (always); return {"png": path,
    "html": path} or, without matplotlib, {"html": path, "note": why there is no PNG}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path | str] = {}
    note = plots.unavailable()
    png = None
    if note is None:
        png = scatter_png(results, title)
        files["png"] = atomic_write(out / "ti.png", lambda tmp: tmp.write_bytes(png))
    else:
        note = f"no ti.png: {note}"
        files["note"] = note
    text = render_html(base_name, base_scores, tuned, results, png, note)
    files["html"] = atomic_write(out / "ti.html", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return files
