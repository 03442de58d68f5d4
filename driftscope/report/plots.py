"""Figures of a drift run, each a function of plain summary data that returns PNG bytes; matplotlib (Agg) is
imported only when a figure is drawn, and `unavailable()` says why plots cannot be drawn (None when they can).

Rendering goes through `Figure` + `FigureCanvasAgg`, i.e. the Agg backend without touching pyplot's global
backend or figure registry (an embedding Jupyter session keeps its own backend; no figure leaks).
"""
from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Mapping, Sequence

from driftscope.report.tables import escape_code_point, visible_text

__all__ = ["unavailable", "pca_shift_png", "layer_drift_png", "kl_histogram_png", "rank_shift_histogram_png",
           "top_tokens_png", "mpl_text", "bin_labels", "occupied_bins"]

KL_NAMES = {"kl_tb": "KL(tuned ‖ base)", "kl_bt": "KL(base ‖ tuned)"}
_DPI = 110
_EDGE_BIN = dict(color="#bbbbbb", hatch="//", edgecolor="#555555")
STATE_AXIS = "hidden-state index (0 = embeddings)"


def unavailable() -> str | None:
    """None when matplotlib imports, else the reason and the fix, for the report to show."""
    try:  # an import probe (through builtins.__import__, as `import` is): the figures import what they draw with
        __import__("matplotlib.backends.backend_agg")
    except ImportError as e:
        return f"plots need matplotlib, which did not import ({e}); pip install matplotlib"
    return None


# ---- shared helpers ------------------------------------------------------------------------------------------
def _figure(width: float, height: float, ncols: int = 1):
    """A detached Agg figure and its axes (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
_MATHTEXT = re.compile(r"^\$\\mathdefault\{(.*)\}\$$")


def plain_log_label(label: str) -> str:
    """A log axis' tick label from matplotlib's scientific formatter (`$\\mathdefault{10^{-3}}$`,
    `$\\mathdefault{2\\times10^{1}}$`) as plain text (`10⁻³`, `2×10¹`), drawn without mathtext: its parser and
    fonts took 0.3-0.4 s of a CLI drift report's two log-axis figures (bench/RESULTS.md)."""
    m = _MATHTEXT.match(label)
    if m is None:
        return label
    body = m.group(1).replace("\\times", "×")
    return re.sub(r"\^\{([^}]*)\}", lambda e: e.group(1).translate(_SUPERSCRIPT), body)


def _log_scale(ax, which: str) -> None:
    """A log scale on ax's "x" or "y" axis with matplotlib's tick positions and labels, the labels as plain text."""
    from matplotlib.ticker import LogFormatterSciNotation

    class PlainLogFormatter(LogFormatterSciNotation):
        def __call__(self, x, pos=None):
            return plain_log_label(super().__call__(x, pos))

    getattr(ax, f"set_{which}scale")("log")  # the scale's default locators and formatters, then the labels replaced
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(PlainLogFormatter(10))
    axis.set_minor_formatter(PlainLogFormatter(10, labelOnlyBase=False))


@functools.lru_cache(maxsize=1)
def _font_code_points() -> frozenset[int]:
    from matplotlib import font_manager
    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    return frozenset(font.get_charmap())


def mpl_text(text: str | None, max_chars: int | None = None) -> str:
    """Data text made safe for a matplotlib label: visible (see `visible_text`), cut to `max_chars` with "…",
    `$` escaped so mathtext never starts, characters the default font lacks written as \\uXXXX (not empty boxes)."""
    covered = _font_code_points()
    s = visible_text(text)
    if max_chars is not None and len(s) > max_chars:
        s = s[:max_chars - 1] + "…"
    s = "".join(c if ord(c) in covered or c == " " else escape_code_point(ord(c)) for c in s)
    return s.replace("$", r"\$")


def _num(v) -> float:
    """None (a NaN in the summary) → nan, so a line has a gap there."""
    return math.nan if v is None else float(v)


def _title(fig, title: str) -> None:
    if title:
        fig.suptitle(mpl_text(title), fontsize=11, wrap=True)


def _check_hist(name: str, hist: Mapping) -> tuple[list[float], list[int]]:
    edges, counts = list(hist["edges"]), list(hist["counts"])
    if len(counts) != len(edges) + 1:
        raise ValueError(f"histogram {name!r}: expected len(counts) == len(edges) + 1, "
                         f"got {len(counts)} counts for {len(edges)} edges")
    return edges, counts


# ---- (a) PCA shift -------------------------------------------------------------------------------------------
def _pca_points(records: Sequence[Mapping]) -> dict[str, dict[int, tuple[float, float]]]:
    """{"Original": {layer: (shift, principle)}, "Updated": {...}}; records with a None coordinate are skipped."""
    pts: dict[str, dict[int, tuple[float, float]]] = {"Original": {}, "Updated": {}}
    for r in records:
        if r["state"] not in pts:
            raise ValueError(f"PCA record state must be 'Original' or 'Updated', got {r['state']!r}")
        if r.get("shift") is not None and r.get("principle") is not None:
            pts[r["state"]][int(r["layer"])] = (float(r["shift"]), float(r["principle"]))
    return pts


def pca_shift_png(records: Sequence[Mapping], centroid_distance: float | None = None, title: str = "") -> bytes:
    """The paper's Fig. 3: (shift, principle) per layer for the Original and Updated states, coloured by layer,
    a line from each layer's Original to its Updated point, and both centroids with the distance between them."""
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    pts = _pca_points(records)
    layers = sorted(set(pts["Original"]) | set(pts["Updated"]))
    if not layers:
        raise ValueError("PCA shift plot: no record has both shift and principle")
    fig, (ax,) = _figure(7.0, 5.0)
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    cmap = "viridis"
    for layer in sorted(set(pts["Original"]) & set(pts["Updated"])):
        (x0, y0), (x1, y1) = pts["Original"][layer], pts["Updated"][layer]
        ax.plot([x0, x1], [y0, y1], color="#999999", lw=0.7, zorder=1)
    sc = None
    for state, marker in (("Original", "o"), ("Updated", "^")):
        if ls := sorted(pts[state]):
            sc = ax.scatter([pts[state][i][0] for i in ls], [pts[state][i][1] for i in ls], c=ls, cmap=cmap,
                            norm=norm, marker=marker, s=36, edgecolors="black", linewidths=0.4, zorder=2)
    cents = {s: _centroid(list(p.values())) for s, p in pts.items() if p}
    for state, style in (("Original", dict(marker="X", color="black")), ("Updated", dict(marker="*", color="red"))):
        if state in cents:
            ax.scatter(*cents[state], s=200, alpha=0.85, zorder=1.5, **style)  # under the layer points
    if len(cents) == 2:
        ax.annotate("", xy=cents["Updated"], xytext=cents["Original"], zorder=3,
                    arrowprops=dict(arrowstyle="->", color="red", lw=1.5))
    fig.colorbar(sc, ax=ax, label=STATE_AXIS).ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], ls="", marker="o", color="#777777", label="Original (base)"),
               Line2D([], [], ls="", marker="^", color="#777777", label="Updated (tuned)"),
               Line2D([], [], ls="", marker="X", color="black", ms=10, label="Original centroid"),
               Line2D([], [], ls="", marker="*", color="red", ms=12, label="Updated centroid")]
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.85)
    ax.axvline(0.0, color="#cccccc", lw=0.8, zorder=0)
    ax.set_xlabel("shift along the first principal component (m1: tuned − base)")
    ax.set_ylabel("second principal component (m2)")  # the records' key is the paper's "principle"
    d = "" if centroid_distance is None else f"   centroid distance d = {centroid_distance:.4g}"
    ax.set_title(f"PCA shift per layer{d}", fontsize=10)
    _title(fig, title)
    return _png(fig)


def _centroid(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)


# ---- (b) per-layer hidden-state drift --------------------------------------------------------------------------
def layer_drift_png(layers: Sequence[Mapping], title: str = "") -> bytes:
    """Per layer (summary.json's `layers` rows): cosine and linear CKA (similarity, 1 = unchanged) on the left,
    relative L2 (0 = unchanged) on the right. A metric that is None for every layer (e.g. CKA not computed) is left
    out and named in the legend."""
    if not layers:
        raise ValueError("layer drift plot: no layers")
    x = [int(row["layer"]) for row in layers]
    fig, (ax_sim, ax_l2) = _figure(9.0, 3.6, ncols=2)
    for label, key, style in (("cosine", "cosine", "o-"), ("linear CKA", "cka", "s-")):
        y = [_num(row.get(key)) for row in layers]
        if all(math.isnan(v) for v in y):
            ax_sim.plot([], [], " ", label=f"{label}: not computed")
        else:
            ax_sim.plot(x, y, style, ms=3, label=label)
    ax_sim.set_title("similarity base vs tuned", fontsize=10)
    ax_sim.set_ylabel("similarity")
    ax_sim.legend(fontsize=8)
    ax_l2.plot(x, [_num(row.get("rel_l2")) for row in layers], "o-", ms=3, color="C3", label="‖h_t − h_b‖ / ‖h_b‖")
    ax_l2.set_title("relative L2 distance", fontsize=10)
    ax_l2.set_ylim(bottom=0)
    ax_l2.legend(fontsize=8)
    for ax in (ax_sim, ax_l2):
        ax.set_xlabel(STATE_AXIS)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _title(fig, title)
    return _png(fig)


# ---- (c) KL histograms ---------------------------------------------------------------------------------------
def _log_bins(edges: Sequence[float]) -> list[tuple[float, float]]:
    """(left, right) of the inner bins on a log axis, plus the open-ended edge bins drawn one decade wide:
    [edges[0]/10, edges[0]) for v < edges[0] and [edges[-1], 10·edges[-1]) for v >= edges[-1]."""
    if len(edges) < 2 or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"KL histogram edges must be positive and increasing, at least two, got {list(edges)[:4]}...")
    return [(edges[0] / 10, edges[0])] + list(zip(edges, edges[1:])) + [(edges[-1], edges[-1] * 10)]


def kl_histogram_png(histograms: Mapping[str, Mapping], means: Mapping[str, float | None] | None = None,
                     title: str = "") -> bytes:
    """Per-token KL distributions (kl_tb and/or kl_bt, whichever is present; same edges) from precomputed bins on
    a log x axis, as fractions of tokens. The open-ended first (< edges[0], includes exact zeros) and last
    (>= edges[-1]) bins are hatched bars in grey bands, labelled; an edge bin that is empty for every series is
    left out and the axis cropped to the occupied bins (said in the x label). `means`: dashed lines."""
    names = [k for k in KL_NAMES if histograms.get(k)]
    if not names:
        raise ValueError("KL histogram: neither kl_tb nor kl_bt is present")
    hists = {k: _check_hist(k, histograms[k]) for k in names}
    edges = hists[names[0]][0]
    if any(e != edges for e, _ in hists.values()):
        raise ValueError(f"KL histogram: {names} have different edges; they are drawn on one axis")
    bins = _log_bins(edges)
    fracs = {k: [c / max(sum(counts), 1) for c in counts] for k, (_, counts) in hists.items()}
    show_first, show_last = (any(f[i] > 0 for f in fracs.values()) for i in (0, -1))
    fig, (ax,) = _figure(8.0, 3.8)
    xs = [b[0] for b in bins[1:-1]] + [bins[-2][1]]
    for j, name in enumerate(names):
        ax.stairs(fracs[name][1:-1], xs, color=f"C{j}", lw=1.4, label=KL_NAMES[name])
        ax.stairs(fracs[name][1:-1], xs, color=f"C{j}", alpha=0.15, fill=True)
        _edge_bars(ax, bins, fracs[name], j, len(names), show_first, show_last)
        mean = (means or {}).get(name)
        if mean is not None and mean > 0:
            ax.axvline(mean, color=f"C{j}", ls="--", lw=1, label=f"{KL_NAMES[name]} token mean {mean:.3g}")
    lo, hi = _kl_xlim(bins, list(fracs.values()), show_first, show_last)
    _log_scale(ax, "x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, max(max(f) for f in fracs.values()) * 1.4 or 1.0)
    _edge_bands(ax, bins, f"< {edges[0]:.0e}\n(incl. 0)" if show_first else None,
                f"≥ {edges[-1]:.0e}" if show_last else None)
    empty = [t for t, shown in ((f"< {edges[0]:.0e}", show_first), (f"≥ {edges[-1]:.0e}", show_last)) if not shown]
    ax.set_xlabel("per-token KL (nats)" + (f"; no tokens {' or '.join(empty)}" if empty else ""))
    ax.set_ylabel("fraction of tokens")
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)  # under the axes: it hides no bar or mean line
    ax.grid(alpha=0.3, which="major")
    _title(fig, title)
    return _png(fig)


def _kl_xlim(bins, fracs, show_first: bool, show_last: bool) -> tuple[float, float]:
    """Full range when an edge bin is drawn on that side; else one decade beyond the outermost occupied inner bin,
    within the edges."""
    inner = [i for i in range(1, len(bins) - 1) if any(f[i] > 0 for f in fracs)] or [1, len(bins) - 2]
    lo = bins[0][0] if show_first else max(bins[1][0], bins[inner[0]][0] / 10)
    hi = bins[-1][1] if show_last else min(bins[-2][1], bins[inner[-1]][1] * 10)
    return lo, hi


def _edge_bands(ax, bins, first: str | None, last: str | None) -> None:
    """Grey bands behind the drawn open-ended bins, their ranges written at the top; decade ticks only between."""
    from matplotlib.transforms import blended_transform_factory
    tr = blended_transform_factory(ax.transData, ax.transAxes)
    for (left, right), text in ((bins[0], first), (bins[-1], last)):
        if text is not None:
            ax.axvspan(left, right, color="#eeeeee", zorder=0)
            ax.text(math.sqrt(left * right), 0.97, text, transform=tr, ha="center", va="top", fontsize=7)
    x0, x1 = ax.get_xlim()
    lo, hi = math.ceil(math.log10(max(x0, bins[0][1]))), math.floor(math.log10(min(x1, bins[-1][0])))
    ax.set_xticks([10.0 ** k for k in range(lo, hi + 1)])
    ax.set_xticks([], minor=True)


def _edge_bars(ax, bins, frac, j: int, n_series: int, show_first: bool, show_last: bool) -> None:
    """Series j's open-ended bins as hatched bars, side by side with the other series' in the same band
    (split evenly in log space), each with its share written above when not zero."""
    for (left, right), f, shown in ((bins[0], frac[0], show_first), (bins[-1], frac[-1], show_last)):
        if not shown:
            continue
        ratio = (right / left) ** (1 / n_series)
        lo, hi = left * ratio ** j, left * ratio ** (j + 1)
        ax.bar(lo, f, width=hi - lo, align="edge", color=f"C{j}", alpha=0.6, hatch="//", edgecolor="black", lw=0.5)
        if f > 0:
            ax.text(math.sqrt(lo * hi), f, f"{100 * f:.2g}%", ha="center", va="bottom", fontsize=6, rotation=90)


# ---- (d) rank-shift histograms ---------------------------------------------------------------------------------
def bin_labels(edges: Sequence[float]) -> list[str]:
    """Readable labels of the len(edges)+1 bins (counts[0]: v < e0; counts[i]: e[i-1] <= v < e[i]; last: v >= e[-1]).
    Integer edges give integer ranges ("6..10", "≤ -100001", "≥ 100001"); others give "[a, b)"."""
    ints = all(float(e).is_integer() for e in edges)
    fmt = (lambda v: f"{int(v)}") if ints else (lambda v: f"{v:.3g}")
    inner = [(fmt(a) if b - a == 1 else f"{fmt(a)}..{fmt(b - 1)}") if ints else f"[{fmt(a)}, {fmt(b)})"
             for a, b in zip(edges, edges[1:])]
    return [f"≤ {fmt(edges[0] - 1)}" if ints else f"< {fmt(edges[0])}", *inner, f"≥ {fmt(edges[-1])}"]


_RANK_TITLES = {  # name: (title, x label)
    "rank_shift": ("rank shift of the actual token (> 0: tuned ranks it higher)", "rank_base − rank_tuned"),
    "rank_shift_top": ("rank under base of the tuned model's top-1 token", "base rank (1 = same top-1)"),
}


def occupied_bins(counts: Sequence[int]) -> range:
    """Indices from the first to the last non-empty bin (all bins when every one is empty): bins beyond the largest
    rank seen (e.g. ≥ 100001 for a 400-token vocabulary) are left out of the plot."""
    full = [i for i, c in enumerate(counts) if c > 0] or [0, len(counts) - 1]
    return range(full[0], full[-1] + 1)


def rank_shift_histogram_png(histograms: Mapping[str, Mapping], title: str = "") -> bytes:
    """Bar chart per present histogram (rank_shift, rank_shift_top), one bar per occupied bin (`occupied_bins`) with
    the bin range as its label, log y (the zero-shift bin dominates); open-ended edge bins hatched."""
    names = [k for k in _RANK_TITLES if histograms.get(k)]
    if not names:
        raise ValueError("rank-shift histogram: neither rank_shift nor rank_shift_top is present")
    hists = {k: _check_hist(k, histograms[k]) for k in names}
    keep = {k: occupied_bins(counts) for k, (_, counts) in hists.items()}
    fig, axes = _figure(max(6.0, 0.28 * sum(map(len, keep.values())) + 2.5), 4.0, ncols=len(names))
    for ax, name in zip(axes, names):
        (edges, counts), kept = hists[name], keep[name]
        pos = list(range(len(kept)))
        bars = ax.bar(pos, counts[kept.start:kept.stop], color="C0", width=0.8)
        for i in {0, len(counts) - 1} & set(kept):
            bars[i - kept.start].set(**_EDGE_BIN)
        ax.set_xticks(pos, bin_labels(edges)[kept.start:kept.stop], rotation=60, ha="right", rotation_mode="anchor",
                      fontsize=7)
        ax.set_xlabel(_RANK_TITLES[name][1])
        log = any(c > 0 for c in counts)  # a log axis needs a positive value
        if log:
            _log_scale(ax, "y")
        ax.set_ylabel("tokens (log scale)" if log else "tokens")
        ax.set_title(_RANK_TITLES[name][0], fontsize=9, wrap=True)
        ax.grid(alpha=0.3, axis="y")
    fig.get_layout_engine().set(w_pad=0.1)
    _title(fig, title)
    return _png(fig)


# ---- (e) top shifted tokens ----------------------------------------------------------------------------------
def top_tokens_png(top: Sequence[Mapping], key: str = "count_shifted", n: int = 20, title: str = "") -> bytes:
    """Horizontal bars for the `n` tokens with the largest `key` ("count_shifted" or "mean_abs_shift"), labelled
    with the visible, mathtext-safe token text and id; for count_shifted, all occurrences are drawn behind."""
    if key not in ("count_shifted", "mean_abs_shift"):
        raise ValueError(f"top tokens plot: key must be 'count_shifted' or 'mean_abs_shift', got {key!r}")
    rows = sorted(top, key=lambda r: (r.get(key) is None, -(r.get(key) or 0)))[:n]  # None last; stable
    if not rows:
        raise ValueError("top tokens plot: no rows")
    fig, (ax,) = _figure(7.5, 0.26 * len(rows) + 1.3)
    pos = list(range(len(rows)))
    if key == "count_shifted":
        ax.barh(pos, [r["count"] for r in rows], color="#c6dbef", label="occurrences")
    ax.barh(pos, [_num(r.get(key)) for r in rows], color="C0",
            label="rank changed" if key == "count_shifted" else "mean |rank shift|")
    ax.set_yticks(pos, [f"'{mpl_text(r.get('text'), max_chars=24)}'  #{r['id']}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens" if key == "count_shifted" else "mean |rank_base − rank_tuned|")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(f"top {len(rows)} shifted tokens by {key}", fontsize=10)
    _title(fig, title)
    return _png(fig)


# ---- (f) logit lens against depth --------------------------------------------------------------------------------
def lens_png(lens: Sequence[Mapping], self_lens: Mapping[str, Sequence[Mapping]] | None = None,
             title: str = "") -> bytes:
    """summary.json's `lens` rows (and `self_lens`) against the hidden-state index: left, the token-mean KL both ways
    between the models' lens distributions; middle, their top-1 agreement; right, each model's KL(output ‖ lens_i)
    (self-lens kl_bt: how far its state at i is from its own final prediction)."""
    if not lens:
        raise ValueError("logit-lens plot: no lens rows")
    x = [int(r["index"]) for r in lens]
    mean = lambda rows, k: [_num((r.get(k) or {}).get("token_mean")) for r in rows]
    fig, (ax_kl, ax_top, ax_self) = _figure(11.0, 3.4, ncols=3)
    for k, style in (("kl_tb", "o-"), ("kl_bt", "s--")):
        ax_kl.plot(x, mean(lens, k), style, ms=3, label=KL_NAMES[k])
    ax_kl.set_title("lens KL base vs tuned", fontsize=10)
    ax_kl.set_ylabel("nats (token mean)")
    ax_top.plot(x, [_num(r.get("top1_agreement")) for r in lens], "o-", ms=3, color="C2")
    ax_top.set_title("lens top-1 agreement", fontsize=10)
    ax_top.set_ylim(-0.02, 1.02)
    for who, style in (("base", "o-"), ("tuned", "s--")):
        rows = (self_lens or {}).get(who) or []
        if rows:
            ax_self.plot([int(r["index"]) for r in rows], mean(rows, "kl_bt"), style, ms=3, label=who)
    ax_self.set_title("KL(own output ‖ lens)", fontsize=10)
    ax_kl.legend(fontsize=8)
    ax_self.legend(fontsize=8)
    for ax in (ax_kl, ax_top, ax_self):
        ax.set_xlabel(STATE_AXIS)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _title(fig, title)
    return _png(fig)
