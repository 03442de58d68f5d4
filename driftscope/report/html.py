"""`write_report(out_dir, summary)` writes out_dir/report.html: one self-contained file (inline CSS, PNG plots as
base64 data URIs, no script, no external resource); every data string is escaped. `summary` is summary.json's
schema: per model `drift_run.summary.model_summary`, per task `drift_run.summary.task_summary`.

Without matplotlib the report still has every table, and says how to get the plots. Missing optional parts
(no PCA, CKA None, NaN written as None) show as "—" or are left out with a note; they never fail the report.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from driftscope.probes.kld_stats import llama_cpp_rows
from driftscope.probes.token_metrics import MEANS
from driftscope.report import plots
from driftscope.report.lens_html import examples_section, lens_section
from driftscope.report.markup import details as _details, dig as _get, esc, fmt, html_table, token_cell as _token_cell
from driftscope.util import atomic_write_text

__all__ = ["write_report", "render_report", "CSS", "esc", "html_table", "html_figure"]  # the last three: ti.html

MAX_PROBLEMS_SHOWN = 200
TOP_TOKENS_IN_PLOT = 20

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;vertical-align:top}
th{background:#f3f3f3;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code.tok{white-space:pre;background:#f6f6f6;border:1px solid #e2e2e2;border-radius:3px;padding:0 .2em}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
figure{margin:1em 0 1.5em}figcaption{font-size:.88em;color:#444;max-width:60em}
.tw{overflow-x:auto;max-width:100%}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em;margin:.8em 0}
.error{background:#fdecea;border-left:4px solid #d93025;padding:.5em .8em;margin:.8em 0}
.muted{color:#666;font-size:.9em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
"""


# ---- small HTML builders ---------------------------------------------------------------------------------------
def _kv_table(mapping: Mapping | None) -> str:
    """Key/value table of a flat-ish dict; nested values as compact JSON. Everything escaped."""
    if not mapping:
        return '<p class="muted">none recorded</p>\n'
    rows = [[esc(k), esc(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str))]
            for k, v in mapping.items()]
    return html_table(["key", "value"], rows, numeric_from=2)


def html_figure(png: bytes, alt: str, caption: str) -> str:
    """A figure: the PNG and `caption` (HTML, already escaped) under it, saying how to read it."""
    return (f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">\n'
            f"<figcaption>{caption}</figcaption></figure>\n")


class _Figures:
    """Draws figures for the report: PNG <img> tags, or nothing when matplotlib is missing (the report says so
    once), or a visible error box when one figure fails (the rest of the report is still written). A call returns a
    placeholder; `fill` draws every figure (several at once on forked processes where there are cores for it: each is
    ~0.5 s of single-threaded matplotlib) and puts each in its place."""

    def __init__(self) -> None:
        self.missing = plots.unavailable()
        self.jobs: list[tuple] = []
        self.mark = f"\0figure-{uuid.uuid4().hex}-"  # no text of a report holds it

    def __call__(self, alt: str, caption: str, draw: Callable[..., bytes], *args: Any, **kwargs: Any) -> str:
        if self.missing:
            return ""
        self.jobs.append((alt, caption, draw, args, kwargs))
        return f"{self.mark}{len(self.jobs) - 1}\0"

    def fill(self, html: str) -> str:
        got = _draw_all([job[2:] for job in self.jobs])
        done = [self._html(alt, caption, g) for (alt, caption, *_), g in zip(self.jobs, got)]
        return re.sub(re.escape(self.mark) + r"(\d+)\0", lambda m: done[int(m.group(1))], html)

    @staticmethod
    def _html(alt: str, caption: str, got: bytes | tuple[str, str]) -> str:
        if isinstance(got, bytes):
            return html_figure(got, alt, caption)
        name, msg = got
        warnings.warn(f"report figure {alt!r} failed: {name}: {msg}", stacklevel=4)
        return f'<p class="error">figure “{esc(alt)}” could not be drawn: {esc(name)}: {esc(msg)}</p>\n'


def _draw(job: tuple) -> bytes | tuple[str, str]:
    draw, args, kwargs = job
    try:
        return draw(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 — shown in the report and warned, not hidden
        return type(e).__name__, str(e)


def _draw_all(jobs: list[tuple]) -> list:
    """Each job's PNG or (exception type, message), in order: on up to `_cores()` forked processes when there are
    several jobs (the same bytes as drawn here), else here, and here again if a worker cannot start, dies or is not
    done by `_pool_seconds(len(jobs))` (a child forked while another thread held a lock can hang: its processes are
    killed rather than waited for)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(jobs), _cores())
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        pool = None
        try:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            got = list(pool.map(_draw, jobs, timeout=_pool_seconds(len(jobs))))
            pool.shutdown()
            return got
        except Exception as e:  # noqa: BLE001 — a broken pool, an unpicklable argument, the deadline: drawn here
            if pool is not None:
                _abandon(pool)
            warnings.warn(f"report figures drawn one at a time ({type(e).__name__}: {e or 'no result in time'})",
                          stacklevel=3)
    return [_draw(job) for job in jobs]


def _pool_seconds(n: int) -> float:
    """The figure pool's deadline for n figures: ~0.2-0.6 s each on a quiet machine, this is ~20-50x that."""
    return 60.0 + 10.0 * n


def _abandon(pool) -> None:
    """Stop a pool without waiting for it: queued jobs cancelled, its worker processes killed and reaped."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:  # the pool's own thread may reap one first: then this join just returns
        p.join(5)


def _cores() -> int:
    """The cores this process may use, at most its torch thread count when torch is loaded (the CLI runs 1 thread on
    a busy machine), else OMP_NUM_THREADS when set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch = sys.modules.get("torch")
    try:
        cap = torch.get_num_threads() if torch is not None else int(os.environ.get("OMP_NUM_THREADS") or n)
    except ValueError:
        cap = n
    return max(1, min(n, cap))


# ---- header -----------------------------------------------------------------------------------------------------
def _header(summary: Mapping, figures: _Figures) -> str:
    cfg = summary.get("config") or {}
    models = summary.get("models") or {}
    tuned = {name: m.get("path") or _get(cfg, "tuned", name) for name, m in models.items()}
    tasks = list(dict.fromkeys(t for m in models.values() for t in m.get("tasks") or {}))
    data = cfg.get("data") or {}
    rows = [["base", esc(cfg.get("base", "—"))]]
    rows += [[f"tuned: {esc(n)}", esc(p if p is not None else "—")] for n, p in tuned.items()]
    rows += [[f"task: {esc(t)}", esc(data.get(t, "—"))] for t in tasks]
    out = ["<h1>driftscope report</h1>\n",
           f'<p class="muted">driftscope {esc(summary.get("driftscope_version", "?"))}, '
           f'created {esc(summary.get("created", "?"))}</p>\n',
           "<h2>What was compared</h2>\n", html_table(["", "path"], rows, numeric_from=2)]
    # every tuned model reads the same task files: count each task's problems (skipped records, non-finite results) once
    n_problems = len({(name, p) for m in models.values() for name, t in (m.get("tasks") or {}).items()
                      for p in t.get("problems") or []})
    if n_problems:
        out.append(f'<p class="note">{n_problems:,} problem{"" if n_problems == 1 else "s"} (skipped records, '
                   f"non-finite results); see “Problems” in each task section.</p>\n")
    if figures.missing:
        out.append(f'<p class="note">No plots in this report: {esc(figures.missing)}. '
                   f"All tables are complete.</p>\n")
    out.append(_timing(summary.get("timing")))
    out.append(_details("Run configuration, versions, machine", _run_details(summary)))
    return "".join(out)


_SHOWN_ELSEWHERE = ("driftscope_version", "created", "models", "timing")


def _run_details(summary: Mapping) -> str:
    """config, versions, machine, then every other top-level entry (gpu_telemetry, backends, ...) as a table."""
    keys = ["config", "versions", "machine"]
    keys += [k for k in summary if k not in keys and k not in _SHOWN_ELSEWHERE and summary[k] is not None]
    return "".join(f"<h3>{esc(k)}</h3>\n" + (_kv_table(v) if isinstance(v, Mapping) or v is None
                                            else f"<p>{esc(json.dumps(v, ensure_ascii=False, default=str))}</p>\n")
                   for k, v in ((k, summary.get(k)) for k in keys))


def _timing(timing: Mapping | None) -> str:
    if not isinstance(timing, Mapping):
        return ""
    return (f'<p class="muted">Ran {fmt(timing.get("tokens"))} tokens in {fmt(timing.get("seconds"), 3)} s '
            f'({fmt(timing.get("tokens_per_s"), 3)} tokens/s).</p>\n')


def _toc(sections: Sequence[tuple[str, str, str]]) -> str:
    items = "".join(f'<li><a href="#{sid}">{esc(m)} / {esc(t)}</a></li>\n' for sid, m, t in sections)
    return f"<h2>Sections</h2>\n<ul>\n{items}</ul>\n" if sections else ""


# ---- overview ------------------------------------------------------------------------------------------------
_OVERVIEW_HEADER = ["task", "tokens", "samples", "KL(t‖b) token mean", "KL(t‖b) sample mean",
                    "KL(b‖t) token mean", "KL(b‖t) sample mean", "sampled KL (paper)",
                    "rank shift token mean", "rank shift sample mean", "top-1 agreement"]


def _overview_row(task_name: str, sid: str, t: Mapping) -> list[str]:
    return [f'<a href="#{sid}">{esc(task_name)}</a>', fmt(t.get("tokens")), fmt(t.get("samples")),
            fmt(_get(t, "kl_tb", "token_mean")), fmt(_get(t, "kl_tb", "sample_mean")),
            fmt(_get(t, "kl_bt", "token_mean")), fmt(_get(t, "kl_bt", "sample_mean")), fmt(t.get("sampled_kl")),
            fmt(_get(t, "rank_shift", "token_mean")), fmt(_get(t, "rank_shift", "sample_mean")),
            fmt(t.get("top1_agreement"))]


def _overview(models: Mapping, section_ids: Mapping[tuple[str, str], str]) -> str:
    out = ["<h2>Overview across tasks</h2>\n"]
    for model_name, m in models.items():
        tasks = m.get("tasks") or {}
        rows = [_overview_row(t, section_ids[(model_name, t)], task) for t, task in tasks.items()]
        out.append(f"<h3>{esc(model_name)}</h3>\n")
        out.append(html_table(_OVERVIEW_HEADER, rows) if rows else '<p class="muted">no tasks</p>\n')
        if rows:
            notes = "".join(_rank_means(f"In {t}", task) for t, task in tasks.items())
            out.append(f'<p class="muted">{MEANS_NOTE}{notes}</p>\n')
        out.append(f"<p>Token rank shift, mean of task means (the paper's headline): "
                   f"<b>{fmt(m.get('rank_shift_mean_of_task_means'))}</b></p>\n")
    return "".join(out)


# ---- how to read the numbers and figures ---------------------------------------------------------------------
MEANS_NOTE = ("Token mean: the mean over all scored tokens, so long responses weigh more. Sample mean: each "
              "response's own mean, averaged over responses, so every response weighs the same.")
_CAPTIONS = {
    "pca": "One PCA per hidden-state index, fitted on the base model's states there; each point is a model's mean "
           "state projected on it. x: shift, how far the tuned mean moved along the first principal component "
           "(tuned − base, so the base sits at 0); y: the mean on the second principal component (m2). Circles: "
           "base, triangles: tuned, colour: hidden-state index (0 = embeddings); a grey line joins one index's "
           "two points, longer = more drift there. The red arrow joins the centroids (means over indices); its "
           "length is the centroid distance d = {d}.",
    "layers": "x: hidden-state index (0 = embeddings, last = after the final norm). Left: cosine similarity (mean "
              "over tokens) and linear CKA of the base and tuned states, 1 = unchanged, lower = more drift. "
              "Right: relative L2 distance ‖h_t − h_b‖ / ‖h_b‖ (mean over tokens), 0 = unchanged, 0.5 = the "
              "difference is half as long as the base state.",
    "kl": "x: per-token KL divergence between the two models' next-token distributions, in nats (log scale); y: "
          "fraction of scored tokens. KL is 0 where the two distributions are identical and grows as they differ; "
          "hatched bars collect the tokens below / above the axis (exact zeros in the left one). Dashed lines: "
          "token means.",
    "rank": "Rank shift = rank_base − rank_tuned of the actual next token (rank 1 = the model's top choice): > 0, "
            "the tuned model ranks it higher; 0, unchanged. Base rank of the tuned top-1 token: 1 = both models "
            "agree on the most likely token. y: tokens (log scale); bins beyond the outermost non-empty ones are "
            "left out; hatched bars are open-ended.",
    "top": "The token ids whose rank changed most often: dark, the occurrences where rank_base ≠ rank_tuned; light, "
           "all its occurrences in the scored text. Label: the token's text in quotes (↵ newline, ⇥ tab) and its id.",
}


def _kl_context(t: Mapping) -> str:
    """What the token-mean KL means: exp(KL) as a likelihood ratio, and the base entropy for scale."""
    kl, h = _get(t, "kl_tb", "token_mean"), _get(t, "entropy_base", "token_mean")
    if kl is None:
        return ""
    out = (f" Here KL(tuned ‖ base) averages {fmt(kl)} nats per token: tokens drawn from the tuned model are, in "
           f"geometric mean, e^KL = {fmt(math.exp(min(kl, 700.0)))}× as likely under it as under the base.")
    if h is not None and kl > 0:
        out += (f" For scale, the base model's own uncertainty (mean entropy) is {fmt(h)} nats per token, "
                f"{fmt(h / kl, 2)}× this KL.")
    return out


def _rank_means(label: str, t: Mapping) -> str:
    """A sentence when the rank shift's token and sample means have opposite signs; "" otherwise."""
    a, b = _get(t, "rank_shift", "token_mean"), _get(t, "rank_shift", "sample_mean")
    if a is None or b is None or a * b >= 0:
        return ""
    return (f" {esc(label)}, the rank shift's token mean ({fmt(a)}) and sample mean ({fmt(b)}) have opposite signs: "
            f"the tokens of long responses moved {'up' if a > 0 else 'down'} on net, the typical response "
            f"{'up' if b > 0 else 'down'}.")


# ---- one (model, task) section -------------------------------------------------------------------------------
def _metrics_table(t: Mapping) -> str:
    rows = [[label, fmt(_get(t, key, "token_mean")), fmt(_get(t, key, "sample_mean"))]
            for key, label in MEANS.items() if key in t]
    scalars = [["sampled KL (paper estimator)", fmt(t.get("sampled_kl"))],
               ["top-1 agreement", fmt(t.get("top1_agreement"))],
               ["tokens", fmt(t.get("tokens"))], ["samples", fmt(t.get("samples"))]]
    if t.get("cka_mode"):
        scalars.append(["CKA mode", esc(t["cka_mode"])])
    pca = t.get("pca")
    if pca:
        scalars.append([f"PCA centroid distance ({esc(pca.get('mode', '?'))})", fmt(pca.get("centroid_distance"))])
    return (html_table(["metric", "token mean", "sample mean"], rows) + f'<p class="muted">{MEANS_NOTE}'
            f"{_rank_means('Here', t)}</p>\n" + html_table(["metric", "value"], scalars))


def _llama_cpp(t: Mapping) -> str:
    """llama.cpp's `llama-perplexity --kl-divergence` statistics, in its order and with its labels."""
    sections = llama_cpp_rows(t.get("llama_cpp"))
    if not sections:
        return ""
    body = "".join(f"<h4>{esc(name)}</h4>\n" + html_table(["", "value"], [[esc(a), esc(b)] for a, b in rows])
                   for name, rows in sections.items())
    note = ('<p class="muted">As llama.cpp prints them, with base = the base model and Q = the tuned model, over '
            "the scored tokens; exact fp32 logits (llama.cpp quantizes the base log-probs to 16 bits).</p>\n")
    return _details("llama.cpp --kl-divergence statistics", note + body)


_LAYER_COLS = ("layer", "cosine", "rel_l2", "cka", "pca_shift", "pca_principle_base", "pca_principle_tuned")


_SHOWN_AS = {"layer": "hidden state", "pca_principle_base": "pca m2 base", "pca_principle_tuned": "pca m2 tuned"}


def _layers_table(layers: Sequence[Mapping]) -> str:
    """One row per hidden state; the summary's keys as headers, but m2 (the paper's "principle") by its name."""
    cols = list(_LAYER_COLS) + list(dict.fromkeys(k for row in layers for k in row if k not in _LAYER_COLS))
    rows = [[fmt(row.get(c)) for c in cols] for row in layers]
    return _details(f"Per-layer table ({len(layers)} hidden states)",
                    html_table([esc(_SHOWN_AS.get(c, c)) for c in cols], rows, numeric_from=0))


def _tokens_table(st: Mapping) -> str:
    top = st.get("top") or []
    head = (f"<p>{fmt(st.get('shifted'))} of {fmt(st.get('tokens'))} scored tokens changed rank, "
            f"{fmt(st.get('distinct_shifted'))} distinct token ids. "
            f'<span class="muted">Token text: ↵ newline, ⇥ tab, \\xNN / \\uXXXX other invisible characters, '
            f"∅ no text.</span></p>\n")
    rows = [[esc(r.get("id")), _token_cell(r.get("text")), fmt(r.get("count")),
             fmt(r.get("count_shifted")), fmt(r.get("frac_shifted")), fmt(r.get("mean_shift")),
             fmt(r.get("mean_abs_shift"))] for r in top]
    header = ["id", "text", "count", "count shifted", "frac shifted", "mean shift", "mean |shift|"]
    table = html_table(header, rows, numeric_from=2) if rows else '<p class="muted">no shifted tokens</p>\n'
    return head + _details(f"Top shifted tokens ({len(top)} rows)", table)


def _problems(problems: Sequence[str]) -> str:
    if not problems:
        return ""
    shown = "".join(f"<li><code>{esc(p)}</code></li>\n" for p in problems[:MAX_PROBLEMS_SHOWN])
    more = (f"<li>… and {len(problems) - MAX_PROBLEMS_SHOWN:,} more</li>\n"
            if len(problems) > MAX_PROBLEMS_SHOWN else "")
    return _details(f"Problems ({len(problems):,})", f"<ul>\n{shown}{more}</ul>\n")


def _section(sid: str, model_name: str, task_name: str, t: Mapping, figures: _Figures) -> str:
    label = f"{model_name} / {task_name}"
    hists = t.get("histograms") or {}
    layers = t.get("layers") or []
    pca = t.get("pca")
    st = t.get("shifted_tokens") or {}
    out = [f'<h2 id="{sid}">{esc(model_name)} / {esc(task_name)}</h2>\n', _metrics_table(t), _llama_cpp(t)]
    out.append("<h3>Hidden states per layer</h3>\n")
    if pca and pca.get("records"):
        out.append(figures(f"PCA shift, {label}", _CAPTIONS["pca"].format(d=fmt(pca.get("centroid_distance"))),
                           plots.pca_shift_png, pca["records"],
                           pca.get("centroid_distance"), title=label))
    else:
        out.append('<p class="muted">No PCA shift in this run.</p>\n')
    if layers:
        if all(row.get("cka") is None for row in layers):
            out.append('<p class="muted">CKA was not computed for this run.</p>\n')
        out.append(figures(f"layer drift, {label}", _CAPTIONS["layers"], plots.layer_drift_png, layers, title=label))
        out.append(_layers_table(layers))
    out.append(lens_section(t, label, figures))
    out.append("<h3>Token distributions</h3>\n")
    if hists.get("kl_tb") or hists.get("kl_bt"):
        means = {k: _get(t, k, "token_mean") for k in ("kl_tb", "kl_bt")}
        out.append(figures(f"KL histogram, {label}", _CAPTIONS["kl"] + _kl_context(t), plots.kl_histogram_png,
                           hists, means, title=label))
    if hists.get("rank_shift") or hists.get("rank_shift_top"):
        out.append(figures(f"rank shift histogram, {label}", _CAPTIONS["rank"], plots.rank_shift_histogram_png,
                           hists, title=label))
    out.append("<h3>Shifted tokens</h3>\n")
    if st.get("top"):
        out.append(figures(f"top shifted tokens, {label}", _CAPTIONS["top"], plots.top_tokens_png, st["top"],
                           n=TOP_TOKENS_IN_PLOT, title=label))
    out.append(_tokens_table(st))
    out.append(examples_section(t))
    out.append(_problems(t.get("problems") or []))
    return "".join(out)


# ---- the document --------------------------------------------------------------------------------------------
def render_report(summary: Mapping) -> str:
    """The report as one HTML string (see the module docstring)."""
    figures = _Figures()
    models = summary.get("models") or {}
    pairs = [(m, t) for m, mv in models.items() for t in mv.get("tasks") or {}]
    ids = {pair: f"s{i}" for i, pair in enumerate(pairs)}
    body = [_header(summary, figures), _toc([(sid, m, t) for (m, t), sid in ids.items()]), _overview(models, ids),
            *(_section(sid, m, t, models[m]["tasks"][t], figures) for (m, t), sid in ids.items())]
    if not models:
        body.append('<p class="note">The summary has no models: nothing was compared.</p>\n')
    return figures.fill("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
                        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                        f"<title>driftscope report</title>\n<style>{CSS}</style>\n</head><body>\n"
                        + "".join(body) + "</body></html>\n")


def write_report(out_dir: Path, summary: dict) -> Path:
    """Write `out_dir/report.html` (creating out_dir) atomically and return its path."""
    return atomic_write_text(Path(out_dir) / "report.html", render_report(summary))
