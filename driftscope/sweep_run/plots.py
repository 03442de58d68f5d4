"""Figures of a sweep, each a function of plain sweep.json data that returns PNG bytes: metrics against the
ordinal, layer × checkpoint heat maps, eval scores and TI against the ordinal. matplotlib (Agg, no pyplot) is
imported only when a figure is drawn; `driftscope.report.plots.unavailable` says when it cannot be.

The x axis (`OrdinalAxis`) is the checkpoints' ordinal (step, epoch, bits) when every checkpoint has one, else
their order. Missing values (None) are gaps in a line and grey cells in a heat map, never an error.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from driftscope.report.plots import mpl_text

__all__ = ["OrdinalAxis", "METRIC_PANELS", "HEATMAPS", "LENS_HEATMAPS", "metric_value", "metrics_png", "heatmap_png",
           "scores_png", "ti_png"]

_DPI = 110
_NOT_DRAWN = "#bbbbbb"
_TICK = 8

# (panel title, [(line label, path in the task block)], how to read it)
METRIC_PANELS: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...], str], ...] = (
    ("KL(tuned ‖ base)", (("token mean", ("kl_tb", "token_mean")),), "higher = more drift"),
    ("KL(base ‖ tuned)", (("token mean", ("kl_bt", "token_mean")),), "higher = more drift"),
    ("sampled KL (paper)", (("sampled KL", ("sampled_kl",)),), "higher = more drift"),
    ("rank shift", (("token mean", ("rank_shift", "token_mean")),), "away from 0 = more drift"),
    ("top-1 agreement", (("top-1 agreement", ("top1_agreement",)),), "lower = more drift"),
    ("entropy (nats)", (("base", ("entropy_base", "token_mean")), ("tuned", ("entropy_tuned", "token_mean"))),
     "tuned away from base = more drift"),
    ("PCA centroid distance d", (("d", ("pca", "centroid_distance")),), "higher = more drift"),
)
# layer-row key: (panel title, colour-bar label, colour map: the dark end is "more drift", transform)
HEATMAPS: dict[str, tuple[str, str, str]] = {
    "cosine": ("cosine similarity", "cosine (1 = unchanged)", "viridis"),
    "rel_l2": ("relative L2 distance", "‖h_t − h_b‖ / ‖h_b‖ (0 = unchanged)", "viridis_r"),
    "cka": ("linear CKA", "CKA (1 = unchanged)", "viridis"),
    "pca_shift": ("|PCA shift| along PC1", "|shift| (0 = unchanged)", "viridis_r"),
}
# the same for the task block's "lens" rows (keyed by "index"); a dotted key is a path into the row
LENS_HEATMAPS: dict[str, tuple[str, str, str]] = {
    "kl_bt.token_mean": ("lens KL(base ‖ tuned), token mean", "nats (0 = unchanged)", "viridis_r"),
    "top1_agreement": ("lens top-1 agreement", "agreement (1 = unchanged)", "viridis"),
}


def metric_value(block: Mapping | None, path: Sequence[str]) -> float | None:
    """block[path[0]][path[1]]...; None where a level is missing, None or not a number."""
    v = block
    for key in path:
        v = v.get(key) if isinstance(v, Mapping) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _fmt_ordinal(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


@dataclass(frozen=True)
class OrdinalAxis:
    """Where the checkpoints sit on x. `numeric`: every checkpoint has an ordinal and x is it; otherwise x is the
    checkpoint's position (0, 1, ...) and `note` says so."""
    labels: tuple[str, ...]
    ordinals: tuple[float | None, ...]
    name: str

    @classmethod
    def of(cls, checkpoints: Sequence[Mapping], name: str | None) -> OrdinalAxis:
        ords = tuple(None if c.get("ordinal") is None else float(c["ordinal"]) for c in checkpoints)
        return cls(tuple(str(c.get("label")) for c in checkpoints), ords, name or "ordinal")

    @property
    def numeric(self) -> bool:
        return bool(self.ordinals) and all(o is not None for o in self.ordinals)

    @property
    def xs(self) -> list[float]:
        return [float(o) for o in self.ordinals] if self.numeric else [float(i) for i in range(len(self.labels))]

    @property
    def xlabel(self) -> str:
        return self.name if self.numeric else f"checkpoints in order (tick: {self.name}, else label)"

    @property
    def note(self) -> str | None:
        missing = sum(o is None for o in self.ordinals)
        if not missing:
            return None
        return (f"{missing} of {len(self.ordinals)} checkpoints have no {self.name}: every plot places the "
                f"checkpoints by their order in the sweep (equal spacing), labelled by {self.name} or label.")

    def tick_text(self, i: int, max_chars: int = 14) -> str:
        o = self.ordinals[i]
        return _fmt_ordinal(o) if o is not None else mpl_text(self.labels[i], max_chars=max_chars)


# ---- shared helpers ------------------------------------------------------------------------------------------
def _figure(width: float, height: float, nrows: int, ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08)
    return buf.getvalue()


def _width(k: int, base: float) -> float:
    """Figure width grows modestly with the number of checkpoints: +0.03 in per checkpoint, at most +1.5 in (the
    page is 1400 px wide: a wider figure would only be scaled down)."""
    return base + min(1.5, 0.03 * k)


def _marker_size(k: int) -> float:
    return 4.0 if k <= 12 else 3.0 if k <= 30 else 2.0


def _every(k: int, room: int) -> int:
    """Label every n-th of k categorical ticks so that at most `room` labels show."""
    return max(1, math.ceil(k / max(room, 1)))


def _x_axis(ax, axis: OrdinalAxis, room: int) -> None:
    """x label and ticks: the ordinal's own ticks (integers when all ordinals are), or every n-th checkpoint."""
    from matplotlib.ticker import MaxNLocator
    k = len(axis.labels)
    if axis.numeric:
        xs = sorted(set(axis.xs))
        span = (xs[-1] - xs[0]) or 1.0
        if len(xs) <= room and all(b - a >= span / (2 * room) for a, b in zip(xs, xs[1:])):
            ax.set_xticks(xs, [_fmt_ordinal(x) for x in xs])  # few, apart: a tick at each checkpoint's ordinal
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=min(room, 8), integer=all(x.is_integer() for x in xs)))
        ax.tick_params(axis="x", labelsize=_TICK, labelrotation=30 if max(map(abs, axis.xs)) >= 1e4 else 0)
    else:
        n = _every(k, room)
        pos = list(range(0, k, n))
        ax.set_xticks(pos, [axis.tick_text(i) for i in pos], rotation=60 if k > 4 else 0, ha="right" if k > 4
                      else "center", rotation_mode="anchor", fontsize=_TICK)
    ax.set_xlabel(mpl_text(axis.xlabel), fontsize=8)


def _line(ax, xs: Sequence[float], ys: Sequence[float | None], k: int, **style) -> bool:
    """A line with marked points; None values are gaps. False (nothing drawn) when every value is None."""
    y = [_num(v) for v in ys]
    if all(math.isnan(v) for v in y):
        return False
    ax.plot(xs, y, **{"marker": "o", "ms": _marker_size(k), "lw": 1.2, **style})
    return True


def _no_data(ax, text: str = "not computed") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777777", fontsize=9)
    ax.set_yticks([])


def _title(fig, title: str) -> None:
    if title:
        fig.suptitle(mpl_text(title), fontsize=11)


# ---- (a) metrics against the ordinal -----------------------------------------------------------------------------
def metrics_png(axis: OrdinalAxis, blocks: Sequence[Mapping | None], title: str = "") -> bytes:
    """Small multiples, one panel per METRIC_PANELS entry: the metric of each checkpoint's task block (`blocks`, in
    the axis' order; None = this checkpoint has no result for the task) against x."""
    if len(blocks) != len(axis.labels):
        raise ValueError(f"metrics plot: {len(blocks)} task blocks for {len(axis.labels)} checkpoints")
    k, ncols = len(blocks), 4
    nrows = math.ceil((len(METRIC_PANELS) + 1) / ncols)  # + the legend's panel
    fig, axes = _figure(_width(k, 11.0), 2.7 * nrows + 0.4, nrows, ncols)
    legend = []
    for ax, (name, lines, reading) in zip(axes, METRIC_PANELS):
        drawn = False
        for j, (label, path) in enumerate(lines):
            style = dict(color=f"C{j}", label=label, **(dict(ls="--", marker="x") if label == "base" else {}))
            if _line(ax, axis.xs, [metric_value(b, path) for b in blocks], k, **style):
                drawn = True
                legend += [(f"{name.split(' (')[0]}: {label}", style)] * (len(lines) > 1)
        if not drawn:
            _no_data(ax)
        elif "away from 0" in reading:
            ax.axhline(0.0, color="#999999", lw=0.8)
        ax.set_title(f"{name}\n({reading})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="y", labelsize=_TICK)
        _x_axis(ax, axis, room=8)
    for ax in axes[len(METRIC_PANELS):]:
        ax.axis("off")
    if legend:  # in the free panel: outside every axes, taking no width from them
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], **{"marker": "o", **st, "label": lab}) for lab, st in legend]
        axes[-1].legend(handles=handles, loc="center", fontsize=8, frameon=False)
    _title(fig, title)
    return _png(fig)


# ---- (b) layer × checkpoint heat maps ------------------------------------------------------------------------
def _matrix(blocks: Sequence[Mapping | None], key: str, rows: str = "layers",
            index: str = "layer") -> tuple[list[int], list[list[float]]]:
    """(layers, rows[layer][checkpoint]) of `key` (dotted: a path) in each block's `rows` list, keyed by `index`;
    NaN where a checkpoint lacks the layer or value."""
    per = [{int(r[index]): metric_value(r, key.split(".")) for r in (b or {}).get(rows) or []} for b in blocks]
    found = {layer for p in per for layer in p}
    layers = list(range(min(found), max(found) + 1)) if found else []  # indices none has (lens every:n): grey rows
    tr = abs if key == "pca_shift" else (lambda v: v)
    return layers, [[math.nan if p.get(layer) is None else tr(p[layer]) for p in per] for layer in layers]


def heatmap_png(axis: OrdinalAxis, blocks: Sequence[Mapping | None], title: str = "", *, rows: str = "layers",
                index: str = "layer", maps: Mapping[str, tuple[str, str, str]] = HEATMAPS) -> bytes:
    """One panel per `maps` metric (HEATMAPS over the blocks' "layers"; LENS_HEATMAPS with rows="lens",
    index="index"): layers (hidden-state index, 0 = embeddings) on y, checkpoints on x in the axis' order (equal
    widths), each cell that layer's value for that checkpoint; grey = not computed."""
    import matplotlib as mpl
    from matplotlib.ticker import MaxNLocator
    if len(blocks) != len(axis.labels):
        raise ValueError(f"heat map: {len(blocks)} task blocks for {len(axis.labels)} checkpoints")
    k = len(blocks)
    nrows = math.ceil(len(maps) / 2)
    fig, axes = _figure(_width(k, 10.0), 0.4 + 3.5 * nrows, nrows, 2)
    for ax, (key, (name, unit, cmap_name)) in zip(axes, maps.items()):
        layers, values = _matrix(blocks, key, rows, index)
        ax.set_title(name, fontsize=9)
        if not layers or all(math.isnan(v) for row in values for v in row):
            _no_data(ax)
            ax.set_xticks([])
            continue
        cmap = mpl.colormaps[cmap_name].with_extremes(bad=_NOT_DRAWN)
        im = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest",
                       extent=(-0.5, k - 0.5, layers[0] - 0.5, layers[-1] + 0.5))
        cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
        cbar.set_label(unit, fontsize=8)
        cbar.ax.tick_params(labelsize=_TICK)
        n = _every(k, 16)
        pos = list(range(0, k, n))
        ax.set_xticks(pos, [axis.tick_text(i) for i in pos], rotation=60 if k > 6 else 0,
                      ha="right" if k > 6 else "center", rotation_mode="anchor", fontsize=_TICK)
        ax.set_xlabel(mpl_text(f"checkpoint (by {axis.name})" if axis.numeric else axis.xlabel)
                      + (f", every {n}th labelled" if n > 1 else ""), fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.tick_params(axis="y", labelsize=_TICK)
        ax.set_ylabel("hidden-state index", fontsize=8)
    _title(fig, title)
    return _png(fig)


# ---- (c) eval scores and TI against the ordinal --------------------------------------------------------------
def scores_png(axis: OrdinalAxis, base: Mapping[str, float | None], scores: Sequence[Mapping | None],
               benchmarks: Sequence[str], title: str = "") -> bytes:
    """One panel per benchmark: each checkpoint's score (None: a gap) against x, the base's as a dashed line."""
    if not benchmarks:
        raise ValueError("scores plot: no benchmarks")
    k, ncols = len(scores), min(4, len(benchmarks))
    nrows = math.ceil(len(benchmarks) / ncols)
    fig, axes = _figure(_width(k, 2.9 * ncols + 0.6), 2.5 * nrows + 0.6, nrows, ncols)
    for ax, bench in zip(axes, benchmarks):
        drawn = _line(ax, axis.xs, [metric_value(s, (bench,)) for s in scores], k, color="C0", label="checkpoint")
        b = metric_value(base, (bench,))
        if b is not None:
            ax.axhline(b, color="black", ls="--", lw=1, label="base")
        if not drawn and b is None:
            _no_data(ax, "no scores")
        ax.set_title(mpl_text(bench), fontsize=9)
        ax.set_ylabel("score (%)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="y", labelsize=_TICK)
        _x_axis(ax, axis, room=7)
    for ax in axes[len(benchmarks):]:
        ax.set_visible(False)
    _legend_below(fig, [("checkpoint", dict(color="C0", marker="o")), ("base", dict(color="black", ls="--"))])
    _title(fig, title)
    return _png(fig)


def _legend_below(fig, entries) -> None:
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], label=label, **style) for label, style in entries]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)


def ti_png(axis: OrdinalAxis, results: Sequence[Mapping | None], method: str = "relative", title: str = "") -> bytes:
    """Left: the group gains (math, other, non) of each checkpoint against x; right: TI_other and TI_non, with
    TI_math = 100 (by definition) dotted. `results`: TIResult.to_dict() per checkpoint (None: no scores)."""
    k = len(results)
    fig, (ax_gain, ax_ti) = _figure(_width(k, 10.0), 3.8, 1, 2)
    gain = "ΔR" if method == "relative" else "DI"
    drawn = False
    for j, group in enumerate(("math", "other", "non")):
        drawn |= _line(ax_gain, axis.xs, [metric_value(r, ("gains", group)) for r in results], k,
                       color=f"C{j}", label=f"{gain}_{group}")
    ax_gain.set_title(f"group gain over the base ({gain}_g, {method})", fontsize=9)
    for j, g in enumerate(("other", "non")):
        drawn |= _line(ax_ti, axis.xs, [metric_value(r, (f"ti_{g}",)) for r in results], k,
                       color=f"C{j + 1}", label=f"TI_{g}")
    ax_ti.axhline(100.0, color="C0", ls=":", lw=1, label="TI_math = 100")
    ax_ti.set_title("transferability index: 100 = the math gain carries over in full", fontsize=9)
    for ax in (ax_gain, ax_ti):
        ax.axhline(0.0, color="#999999", lw=0.8)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="y", labelsize=_TICK)
        _x_axis(ax, axis, room=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if not drawn:
        _no_data(ax_ti, "no TI defined")
    _title(fig, title)
    return _png(fig)
