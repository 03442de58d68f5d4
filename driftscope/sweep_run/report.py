"""`write_report(sweep, out)`: out/sweep.html (self-contained: inline CSS, PNGs as data URIs, every data string
escaped), the same PNGs as files under out/sweep_plots/, and the tidy table out/sweep.parquet (sweep.jsonl without
pyarrow): one row per (checkpoint, task, metric[, layer]). `sweep` is sweep.json's dict.

Without matplotlib every table is still written and the page says how to get the plots. Missing values (None)
are gaps and "—", never a failure.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from driftscope.eval.ti import BENCHMARKS, transferability_index
from driftscope.probes.token_metrics import MEANS
from driftscope.report.html import CSS, esc, fmt, html_figure, html_table
from driftscope.report.plots import unavailable
from driftscope.sweep_run import plots
from driftscope.sweep_run.plots import OrdinalAxis, metric_value
from driftscope.util import atomic_write, atomic_write_text, read_jsonl, strict_json, write_jsonl

__all__ = ["TABLE_COLUMNS", "write_report", "render_html", "table_rows", "task_metrics", "write_table", "read_table"]

PLOTS_DIR = "sweep_plots"
PAGE_CSS = CSS + "body{max-width:1400px}"  # the figures' width (up to ~1380 px) unscaled
OPEN_TABLE_ROWS = 12  # a per-checkpoint table with more rows starts folded
# the tidy table: task/layer are None for checkpoint-level rows (eval scores, TI); label/position None for the base
TABLE_COLUMNS: dict[str, str] = {"label": "string", "position": "int64", "ordinal": "float64", "kind": "string",
                                 "task": "string", "metric": "string", "layer": "int64", "value": "float64"}


# ---- the tidy table ------------------------------------------------------------------------------------------
def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def task_metrics(block: Mapping) -> Iterator[tuple[str, int | None, float | None]]:
    """(metric, layer, value) of one task block: its numbers, token/sample means as "kl_tb.token_mean", the PCA
    centroid distance, llama_cpp and shifted_tokens numbers, every number of every layer row, and every number of
    every logit-lens row as "lens.kl_bt.token_mean" / "self_lens.base.kl_bt.token_mean" with layer = its index.
    A None number (NaN in the run) is a row with value None; a missing or None section (no PCA, no layers, no
    lens) gives no rows."""
    for key, v in block.items():
        if key == "layers":
            for row in v or []:
                yield from ((k, int(row["layer"]), x) for k, x in row.items() if k != "layer" and _number(x))
        elif key == "lens":
            yield from _lens_metrics("lens", v)
        elif key == "self_lens" and isinstance(v, Mapping):
            for who, rows in v.items():
                yield from _lens_metrics(f"self_lens.{who}", rows)
        elif key == "pca" and isinstance(v, Mapping):
            yield "pca.centroid_distance", None, v.get("centroid_distance")
        elif isinstance(v, Mapping) and ("token_mean" in v or key in ("llama_cpp", "shifted_tokens")):
            yield from ((f"{key}.{k}", None, x) for k, x in v.items() if _number(x))
        elif _number(v) and (v is not None or key not in _SECTIONS):
            yield key, None, v


def _lens_metrics(prefix: str, rows: Sequence[Mapping] | None) -> Iterator[tuple[str, int, float | None]]:
    for row in rows or []:
        for k, v in row.items():
            if isinstance(v, Mapping):
                yield from ((f"{prefix}.{k}.{m}", int(row["index"]), x) for m, x in v.items() if _number(x))
            elif k != "index" and _number(v):
                yield f"{prefix}.{k}", int(row["index"]), v


_SECTIONS = {*MEANS, "layers", "pca", "llama_cpp", "shifted_tokens", "histograms", "token_metrics", "problems",
             "lens", "self_lens", "promoted_tokens", "examples"}


def table_rows(sweep: Mapping) -> list[dict]:
    """The tidy table's rows (TABLE_COLUMNS), in checkpoint order; base eval scores last (label None)."""
    rows: list[dict] = []
    results = _ti_results(sweep)
    for i, c in enumerate(sweep.get("checkpoints") or []):
        key = dict(label=c.get("label"), position=i, ordinal=c.get("ordinal"), kind=c.get("kind"))
        for task, block in (c.get("tasks") or {}).items():
            rows += [dict(key, task=task, metric=m, layer=layer, value=v) for m, layer, v in task_metrics(block or {})]
        rows.append(dict(key, task=None, metric="rank_shift_mean_of_task_means", layer=None,
                         value=c.get("rank_shift_mean_of_task_means")))
        rows += [dict(key, task=None, metric=f"score.{b}", layer=None, value=s)
                 for b, s in (c.get("scores") or {}).items()]
        ti = results.get(str(c.get("label"))) or {}
        rows += [dict(key, task=None, metric=f"ti.{k}", layer=None, value=ti.get(k))
                 for k in ("ti_other", "ti_non") if ti]
        rows += [dict(key, task=None, metric=f"ti.gains.{g}", layer=None, value=v)
                 for g, v in (ti.get("gains") or {}).items()]
    base = (sweep.get("eval") or {}).get("base") or {}
    rows += [dict(label=None, position=None, ordinal=None, kind="base", task=None, metric=f"score.{b}", layer=None,
                  value=s) for b, s in base.items()]
    return [{c: strict_json(r[c]) for c in TABLE_COLUMNS} for r in rows]


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return None
    return pyarrow


def write_table(out: Path, rows: list[dict]) -> Path:
    """out/sweep.parquet when pyarrow imports, else out/sweep.jsonl; the other one is removed if present."""
    pa = _pyarrow()
    path, other = out / "sweep.parquet", out / "sweep.jsonl"
    if pa is None:
        path, other = other, path
        write_jsonl(path, rows, ensure_ascii=True)
    else:
        import pyarrow.parquet as pq
        table = pa.table({c: pa.array([r[c] for r in rows], type=getattr(pa, t)()) for c, t in TABLE_COLUMNS.items()})
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    other.unlink(missing_ok=True)
    return path


def read_table(path: Path) -> list[dict]:
    """The rows of sweep.parquet or sweep.jsonl, as dicts with TABLE_COLUMNS keys."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [row for _, row in read_jsonl(path, "sweep table")]
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


# ---- eval: TI per checkpoint --------------------------------------------------------------------------------
def _ti_results(sweep: Mapping, notes: list[str] | None = None) -> dict[str, dict]:
    """label -> TI result as a dict: sweep["eval"]["ti"][label] when given, else computed (relative method) from the
    checkpoint's scores and the base's; none for a checkpoint without scores or whose scores give no TI (why: in
    `notes`)."""
    ev = sweep.get("eval") or {}
    given, base = ev.get("ti") or {}, ev.get("base") or {}
    out = {}
    for c in sweep.get("checkpoints") or []:
        label, r = str(c.get("label")), given.get(c.get("label"))
        if r is None and base and c.get("scores"):
            try:
                r = transferability_index(base, c["scores"])
            except ValueError as e:
                (notes if notes is not None else []).append(f"no TI for checkpoint {label!r}: {e}")
        if r is not None:
            out[label] = r.to_dict() if hasattr(r, "to_dict") else dict(r)
    return out


def _benchmarks(sweep: Mapping) -> list[str]:
    """Every benchmark with a score (base or checkpoint): the TI's order first, then the others by name."""
    ev = sweep.get("eval") or {}
    names = set(ev.get("base") or {}) | {b for c in sweep.get("checkpoints") or [] for b in c.get("scores") or {}}
    return [b for b in BENCHMARKS if b in names] + sorted(names - set(BENCHMARKS))


# ---- figures -------------------------------------------------------------------------------------------------
class _Figures:
    """Draws figures: an embedded <img> per figure (its PNG kept in `.pngs` for the files), nothing when matplotlib
    is missing, a visible error box when one figure fails (the rest is still written)."""

    def __init__(self) -> None:
        self.missing = unavailable()
        self.pngs: dict[str, bytes] = {}

    def __call__(self, name: str, alt: str, caption: str, draw: Callable[..., bytes], *args: Any, **kw: Any) -> str:
        if self.missing:
            return ""
        try:
            png = draw(*args, **kw)
        except Exception as e:  # noqa: BLE001 — shown in the page and warned, not hidden
            warnings.warn(f"sweep figure {alt!r} failed: {type(e).__name__}: {e}", stacklevel=2)
            return f'<p class="error">figure “{esc(alt)}” could not be drawn: {esc(type(e).__name__)}: {esc(e)}</p>\n'
        self.pngs[name] = png
        return html_figure(png, alt, caption)


def _slug(i: int, text: str) -> str:
    return f"{i:02d}-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:40] or "task")


# ---- HTML sections ---------------------------------------------------------------------------------------------
def _counts(blocks: Sequence[Mapping | None]) -> str:
    """"N tokens in M samples" (or the range over checkpoints) of one task."""
    def span(key: str) -> str:
        vals = sorted({b[key] for b in blocks if b and isinstance(b.get(key), int)})
        return "?" if not vals else fmt(vals[0]) if len(vals) == 1 else f"{fmt(vals[0])}–{fmt(vals[-1])}"
    return f"{span('tokens')} scored tokens in {span('samples')} samples"


def _header(sweep: Mapping, axis: OrdinalAxis, figures: _Figures, tasks: list[str]) -> str:
    base, data, ckpts = sweep.get("base") or {}, sweep.get("data") or {}, sweep.get("checkpoints") or []
    rows = [["base", esc(base.get("path")), esc(base.get("kind"))], ["manifest", esc(sweep.get("manifest")), ""]]
    rows += [[f"task: {esc(t)}", esc(data.get(t)), ""] for t in tasks]
    timing = sweep.get("timing") or {}
    out = ["<h1>driftscope sweep</h1>\n",
           f'<p class="muted">driftscope {esc(sweep.get("driftscope_version", "?"))}, created '
           f'{esc(sweep.get("created", "?"))}. {len(ckpts)} checkpoints against one base, ordered by '
           f'{esc(axis.name)}; {fmt(timing.get("base_passes"))} base passes, {fmt(timing.get("seconds"), 3)} s '
           f'({fmt(timing.get("computed_now"))} checkpoints computed in this run).</p>\n',
           "<h2>What was compared</h2>\n", html_table(["", "path", "kind"], rows, numeric_from=3)]
    if axis.note:
        out.append(f'<p class="note">{esc(axis.note)}</p>\n')
    if figures.missing:
        out.append(f'<p class="note">No plots in this report: {esc(figures.missing)}. All tables are complete.</p>\n')
    links = [(f"t{i}", f"dataset {t}") for i, t in enumerate(tasks)]
    links += [("eval", "eval scores and TI")] * bool(sweep.get("eval")) + [("ckpts", "checkpoints"),
                                                                          ("options", "options and passes")]
    out.append("<ul>" + "".join(f'<li><a href="#{a}">{esc(t)}</a></li>' for a, t in links) + "</ul>\n")
    return "".join(out)


def _checkpoints(sweep: Mapping) -> str:
    rows = [[esc(c.get("label")), esc(c.get("kind")), esc(c.get("pass")), esc(c.get("path")), fmt(i),
             fmt(c.get("ordinal")), fmt(c.get("rank_shift_mean_of_task_means"))]
            for i, c in enumerate(sweep.get("checkpoints") or [])]
    head = ["label", "kind", "pass", "path", "#", esc(sweep.get("ordinal") or "ordinal"),
            "rank shift, mean of task means"]
    return '<h2 id="ckpts">Checkpoints</h2>\n' + html_table(head, rows, numeric_from=4)


_TASK_COLS = (("KL(t‖b)", ("kl_tb", "token_mean")), ("KL(b‖t)", ("kl_bt", "token_mean")),
              ("sampled KL", ("sampled_kl",)), ("rank shift", ("rank_shift", "token_mean")),
              ("top-1 agreement", ("top1_agreement",)), ("entropy tuned", ("entropy_tuned", "token_mean")),
              ("PCA d", ("pca", "centroid_distance")), ("tokens", ("tokens",)), ("samples", ("samples",)))
_CAP_METRICS = ("Each panel: one metric on the {task} data against the {x}, one marked point per checkpoint ({k}); "
                "each point is that checkpoint's mean over {counts} (token means: long responses weigh more). KL in "
                "nats; rank shift = rank_base − rank_tuned of the actual token; the panel titles say which "
                "direction is more drift. Entropy: the base model's (dashed, the same model for every checkpoint) "
                "and the checkpoint's. A gap: not computed for that checkpoint.")
_CAP_HEAT = ("Hidden-state drift per layer (rows: hidden-state index, 0 = embeddings) and checkpoint (columns, "
             "equally spaced in {x} order; {k} checkpoints), means over {counts}. Cosine and CKA: 1 = unchanged, "
             "lower = more drift; relative L2 and |PCA shift|: 0 = unchanged, higher = more drift; the dark end of "
             "every colour scale is more drift, and each panel has its own scale. PCA shift: how far the tuned mean "
             "state moved along the base's first principal component at that layer, shown as a magnitude (a "
             "component's sign is arbitrary). Grey: not computed (CKA off, no PCA).")
_CAP_LENS = ("Logit-lens drift per hidden-state index (rows: the indices --lens chose, 0 = embeddings, the top one "
             "= the output) and checkpoint (columns, equally spaced in {x} order; {k} checkpoints): both models' "
             "states at that index read through their own final norm and LM head; token means over {counts}. "
             "Left: KL(base ‖ tuned) in nats, 0 = unchanged; right: top-1 agreement of the two lens "
             "distributions, 1 = unchanged; the dark end is more drift, each panel has its own scale. Where the KL "
             "first rises is where in depth the next-token change starts. Grey: not computed (an index --lens did "
             "not choose, or a checkpoint run without --lens).")


def _folded(title: str, table: str, n_rows: int) -> str:
    """A table under a <details> title, open unless it has more than OPEN_TABLE_ROWS rows."""
    return (f"<details{' open' * (n_rows <= OPEN_TABLE_ROWS)}><summary>{title} ({n_rows} rows)</summary>\n{table}"
            "</details>\n")


def _task_section(i: int, task: str, sweep: Mapping, axis: OrdinalAxis, figures: _Figures) -> str:
    ckpts = sweep.get("checkpoints") or []
    blocks = [(c.get("tasks") or {}).get(task) for c in ckpts]
    fill = dict(task=esc(task), x=esc(axis.name if axis.numeric else "checkpoint order"), k=len(ckpts),
                counts=_counts(blocks))
    slug = _slug(i, task)
    out = [f'<h2 id="t{i}">Dataset {esc(task)}</h2>\n',
           figures(f"{slug}-metrics", f"metrics against {axis.name}, {task}", _CAP_METRICS.format(**fill),
                   plots.metrics_png, axis, blocks, title=f"{task}: drift against {axis.name}"),
           figures(f"{slug}-layers", f"layer heat maps, {task}", _CAP_HEAT.format(**fill),
                   plots.heatmap_png, axis, blocks, title=f"{task}: hidden-state drift per layer and checkpoint")]
    if any((b or {}).get("lens") for b in blocks):
        out.append(figures(f"{slug}-lens", f"logit lens heat maps, {task}", _CAP_LENS.format(**fill),
                           plots.heatmap_png, axis, blocks, title=f"{task}: logit-lens drift per index and checkpoint",
                           rows="lens", index="index", maps=plots.LENS_HEATMAPS))
    rows = [[esc(c.get("label")), fmt(c.get("ordinal")), esc(c.get("kind"))]
            + [fmt(metric_value(b, p)) for _, p in _TASK_COLS] + [fmt(len((b or {}).get("problems") or []))]
            for c, b in zip(ckpts, blocks)]
    head = ["label", esc(sweep.get("ordinal") or "ordinal"), "kind", *(h for h, _ in _TASK_COLS), "problems"]
    out.append(_folded("Numbers per checkpoint", html_table(head, rows, numeric_from=3), len(rows)))
    out.append('<p class="muted">KL and rank shift: token means (every scored token weighs the same).</p>\n')
    return "".join(out)


_CAP_SCORES = ("Benchmark scores (percent) of each checkpoint against the {x} ({k} checkpoints; a gap: not "
               "scored); the dashed line is the base model's score. Higher is better; a checkpoint below the line "
               "lost ground on that benchmark.")
_CAP_TI = ("Left: each checkpoint's gain over the base per benchmark group ({method}: {gain}), 0 = no change. "
           "Right: the transferability index TI_g = 100 × gain_g / gain_math for the other-reasoning and "
           "non-reasoning groups: 100 = the math gain carried over in full, 0 = none, dotted: TI_math = 100 by "
           "definition. A gap: undefined (a missing score, or no math gain).")


def _eval_section(sweep: Mapping, axis: OrdinalAxis, figures: _Figures) -> str:
    ev = sweep.get("eval")
    if not ev:
        return ""
    ckpts, base, benches = sweep.get("checkpoints") or [], ev.get("base") or {}, _benchmarks(sweep)
    notes: list[str] = []
    results = _ti_results(sweep, notes)
    ti = [results.get(str(c.get("label"))) for c in ckpts]
    method = next((r.get("method") for r in ti if r and r.get("method")), "relative")
    fill = dict(x=esc(axis.name if axis.numeric else "checkpoint order"), k=len(ckpts), method=esc(method),
                gain="mean relative gain ΔR_g" if method == "relative" else "domain index DI_g")
    out = ['<h2 id="eval">Eval scores and transferability (TI)</h2>\n',
           *(f'<p class="note">{esc(n)}</p>\n' for n in notes)]
    if benches:
        out.append(figures("eval-scores", "scores against the ordinal", _CAP_SCORES.format(**fill), plots.scores_png,
                           axis, base, [c.get("scores") for c in ckpts], benches, title="benchmark scores"))
    if any(ti):
        out.append(figures("eval-ti", "TI against the ordinal", _CAP_TI.format(**fill), plots.ti_png, axis, ti,
                           method, title="transferability index"))
    rows = [["base", "", *(fmt(metric_value(base, (b,))) for b in benches)]]
    rows += [[esc(c.get("label")), fmt(c.get("ordinal")), *(fmt(metric_value(c.get("scores"), (b,))) for b in benches)]
             for c in ckpts]
    out.append(_folded("Scores per checkpoint", html_table(["model", esc(sweep.get("ordinal") or "ordinal"),
                                                            *map(esc, benches)], rows, numeric_from=1), len(rows)))
    rows = [[esc(c.get("label")), fmt(c.get("ordinal")), fmt(metric_value(r, ("ti_other",))),
             fmt(metric_value(r, ("ti_non",))), *(fmt(metric_value(r, ("gains", g))) for g in ("math", "other", "non"))]
            for c, r in zip(ckpts, ti)]
    out.append(_folded("TI per checkpoint", html_table(["label", esc(sweep.get("ordinal") or "ordinal"), "TI_other",
                                                        "TI_non", "gain math", "gain other", "gain non"], rows,
                                                       numeric_from=1), len(rows)))
    return "".join(out)


def _options(sweep: Mapping) -> str:
    opts = sweep.get("options") or {}
    rows = [[esc(k), esc(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str))]
            for k, v in opts.items()]
    passes = [[esc(p.get("id")), fmt(len(p.get("labels") or [])), esc(", ".join(map(str, p.get("labels") or []))),
               fmt(p.get("seconds"), 3)] for p in sweep.get("passes") or []]
    return ('<h2 id="options">Options and passes</h2>\n'
            + (html_table(["option", "value"], rows, numeric_from=2) if rows else '<p class="muted">defaults</p>\n')
            + html_table(["pass", "checkpoints", "labels", "seconds"], passes, numeric_from=1))


def render_html(sweep: Mapping, figures: _Figures | None = None) -> str:
    """The sweep page as one HTML string (see the module docstring)."""
    figures = figures if figures is not None else _Figures()
    axis = OrdinalAxis.of(sweep.get("checkpoints") or [], sweep.get("ordinal"))
    tasks = list(dict.fromkeys([*(sweep.get("data") or {}),
                                *(t for c in sweep.get("checkpoints") or [] for t in c.get("tasks") or {})]))
    body = [_header(sweep, axis, figures, tasks), *(_task_section(i, t, sweep, axis, figures)
                                                    for i, t in enumerate(tasks)),
            _eval_section(sweep, axis, figures), _checkpoints(sweep), _options(sweep)]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>driftscope sweep</title>\n<style>{PAGE_CSS}</style>\n</head><body>\n" + "".join(body)
            + "</body></html>\n")


def write_report(sweep: dict, out: Path) -> dict[str, Path]:
    """Write sweep.html, sweep_plots/*.png and sweep.parquet (or .jsonl) under `out`, atomically each; PNGs of an
    earlier report that this one does not draw are removed. Returns {path relative to out: path} of what it wrote."""
    out = Path(out)
    figures = _Figures()
    page = render_html(sweep, figures)
    written = {}
    plots_dir = out / PLOTS_DIR
    for name, png in figures.pngs.items():
        path = atomic_write(plots_dir / f"{name}.png", lambda tmp, png=png: tmp.write_bytes(png))
        written[f"{PLOTS_DIR}/{path.name}"] = path
    for old in plots_dir.glob("*.png") if plots_dir.is_dir() else ():
        if f"{PLOTS_DIR}/{old.name}" not in written:
            old.unlink()
    written["sweep.html"] = atomic_write_text(out / "sweep.html", page)
    table = write_table(out, table_rows(sweep))
    written[table.name] = table
    return written
