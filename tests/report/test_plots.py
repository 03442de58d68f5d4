"""Plot functions: PNG bytes for full and partial inputs, named errors for unusable ones, mathtext-safe labels,
readable histogram bin labels."""
from __future__ import annotations

import re
import struct

import pytest
import torch
from report_helpers import block_import, synthetic_summary

from driftscope.probes.token_metrics import RANK_EDGES, RANK_SHIFT_EDGES, histogram_counts
from driftscope.report import plots

pytest.importorskip("matplotlib", reason="matplotlib not installed: plots are left out of the report")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def task() -> dict:
    return synthetic_summary()["models"]["rl"]["tasks"]["coqa"]


def test_unavailable_is_none_with_matplotlib():
    assert plots.unavailable() is None


def test_unavailable_says_why(monkeypatch):
    block_import(monkeypatch, "matplotlib")
    assert "pip install matplotlib" in plots.unavailable()


@pytest.mark.parametrize("text", ["$x$", "cost $5 and $6", "a\\$b", "$", "\\frac{1}{2}$"])
def test_mpl_text_never_starts_mathtext(text):
    from matplotlib.text import Text
    t = Text(0, 0, plots.mpl_text(text))
    shown, is_math = t._preprocess_math(t.get_text())  # what Agg will draw, and whether as mathtext
    assert (shown, is_math) == (text, False)


def test_mpl_text_font_fallback_and_cut():
    assert plots.mpl_text("中\n") == "\\u4e2d↵"
    assert plots.mpl_text("abcdefgh", max_chars=5) == "abcd…"


def test_bin_labels_rank_shift():
    labels = plots.bin_labels(RANK_SHIFT_EDGES)
    assert len(labels) == len(RANK_SHIFT_EDGES) + 1
    assert labels[0] == "≤ -100001" and labels[-1] == "≥ 100001"
    assert "0" in labels and "6..10" in labels and "-10..-6" in labels
    assert plots.bin_labels(RANK_EDGES)[:3] == ["≤ 0", "1", "2"]
    assert plots.bin_labels([0.5, 1.5]) == ["< 0.5", "[0.5, 1.5)", "≥ 1.5"]


def test_every_plot_draws(task):
    pngs = [
        plots.pca_shift_png(task["pca"]["records"], task["pca"]["centroid_distance"], title="m / $t$"),
        plots.layer_drift_png(task["layers"]),
        plots.kl_histogram_png(task["histograms"], {"kl_tb": 0.1, "kl_bt": None}),
        plots.rank_shift_histogram_png(task["histograms"]),
        plots.top_tokens_png(task["shifted_tokens"]["top"]),
        plots.top_tokens_png(task["shifted_tokens"]["top"], key="mean_abs_shift", n=3),
    ]
    assert all(p.startswith(PNG_SIGNATURE) for p in pngs)


def test_partial_inputs_draw(task):
    layers = [dict(r, cka=None, cosine=None if r["layer"] == 2 else r["cosine"]) for r in task["layers"]]
    only_tb = {"kl_tb": task["histograms"]["kl_tb"]}
    kl = task["histograms"]["kl_bt"]
    no_edge_bins = {"kl_bt": dict(kl, counts=[0] + kl["counts"][1:-1] + [0])}  # axis cropped to occupied bins
    only_updated = [r for r in task["pca"]["records"] if r["state"] == "Updated"]
    pngs = [plots.layer_drift_png(layers), plots.kl_histogram_png(only_tb), plots.kl_histogram_png(no_edge_bins),
            plots.rank_shift_histogram_png({"rank_shift_top": task["histograms"]["rank_shift_top"]}),
            plots.pca_shift_png(only_updated), plots.top_tokens_png(task["shifted_tokens"]["top"][:1])]
    assert all(p.startswith(PNG_SIGNATURE) for p in pngs)


def test_unusable_inputs_named():
    with pytest.raises(ValueError, match="got 3 counts for 3 edges"):
        plots.rank_shift_histogram_png({"rank_shift": {"edges": [0, 1, 2], "counts": [1, 2, 3]}})
    with pytest.raises(ValueError, match="neither kl_tb nor kl_bt"):
        plots.kl_histogram_png({})
    with pytest.raises(ValueError, match="positive and increasing"):
        plots.kl_histogram_png({"kl_tb": {"edges": [0.0, 1.0], "counts": [1, 2, 3]}})
    with pytest.raises(ValueError, match="'Original' or 'Updated'"):
        plots.pca_shift_png([{"layer": 0, "state": "Base", "shift": 0.0, "principle": 1.0}])
    with pytest.raises(ValueError, match="no layers"):
        plots.layer_drift_png([])
    with pytest.raises(ValueError, match="key must be"):
        plots.top_tokens_png([{"id": 1}], key="count")


# ---- what a reader sees: labels, bins, titles ---------------------------------------------------------------------
@pytest.fixture()
def drawn(monkeypatch):
    """draw(plot_fn, *args) -> (the figure it saved, the PNG's (width, height) in pixels)."""
    figures, real = [], plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or real(fig))

    def draw(fn, *args, **kwargs):
        png = fn(*args, **kwargs)
        return figures[-1], struct.unpack(">II", png[16:24])  # IHDR: width, height
    return draw


def _texts(fig) -> list[str]:
    from matplotlib.text import Text
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]


def test_pca_and_layer_axes_name_the_hidden_state_index(task, drawn):
    pca = _texts(drawn(plots.pca_shift_png, task["pca"]["records"], 1.0)[0])
    assert not [t for t in pca if "principle" in t.lower()], pca  # the paper's typo stays in the JSON keys only
    assert "second principal component (m2)" in pca and plots.STATE_AXIS in pca  # y axis, colour bar
    layers = _texts(drawn(plots.layer_drift_png, task["layers"])[0])
    assert layers.count(plots.STATE_AXIS) == 2 and "layer" not in " ".join(layers)


def test_occupied_bins():
    assert plots.occupied_bins([0, 0, 3, 0, 5, 0, 0]) == range(2, 5)
    assert plots.occupied_bins([0, 0, 0]) == range(0, 3)  # nothing to crop to: all bins


def test_rank_histograms_stop_at_the_vocabulary_and_label_x(drawn):
    vocab = 400  # ranks 1..400, rank shifts -399..399: nothing in the bins from 1001 on
    g = torch.Generator().manual_seed(0)
    ranks = torch.randint(1, vocab + 1, (2, 3000), generator=g)
    hists = {"rank_shift": {"edges": list(RANK_SHIFT_EDGES),
                            "counts": histogram_counts(ranks[0] - ranks[1], RANK_SHIFT_EDGES).tolist()},
             "rank_shift_top": {"edges": list(RANK_EDGES), "counts": histogram_counts(ranks[0], RANK_EDGES).tolist()}}
    fig, _ = drawn(plots.rank_shift_histogram_png, hists)
    for ax, name in zip(fig.axes, hists):
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        smallest = [min(abs(int(v)) for v in re.findall(r"-?\d+", t)) for t in ticks]  # of each bin's range
        assert max(smallest) < vocab, f"{name}: bins beyond the vocabulary drawn: {ticks}"
        n_occupied = sum(c > 0 for c in hists[name]["counts"])
        assert len(ticks) == n_occupied and ax.get_xlabel(), (name, ticks, ax.get_xlabel())
    assert "101..1000" in ticks and "≤ 0" not in ticks  # the last occupied bin stays; the empty first one goes


@pytest.mark.parametrize("plot", ["pca", "layers", "kl", "rank", "top"])
def test_long_title_is_not_clipped(task, drawn, plot):
    title = "Qwen2.5-Math-7B-Instruct-sft-think-checkpoint-12000 / " + "competition_math_problems_" * 3
    args = {"pca": (plots.pca_shift_png, task["pca"]["records"]), "layers": (plots.layer_drift_png, task["layers"]),
            "kl": (plots.kl_histogram_png, task["histograms"]), "rank": (plots.rank_shift_histogram_png,
            task["histograms"]), "top": (plots.top_tokens_png, task["shifted_tokens"]["top"])}[plot]
    fig, (width, height) = drawn(*args, title=title)
    tight = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, every artist and the super-title included
    assert width >= tight.width * fig.dpi - 1 and height >= tight.height * fig.dpi - 1, \
        f"PNG {width}x{height} px cuts the drawing ({tight.width * fig.dpi:.0f}x{tight.height * fig.dpi:.0f} px)"


@pytest.mark.parametrize("label,plain", [
    (r"$\mathdefault{10^{-3}}$", "10⁻³"), (r"$\mathdefault{10^{0}}$", "10⁰"), (r"$\mathdefault{10^{12}}$", "10¹²"),
    (r"$\mathdefault{2\times10^{1}}$", "2×10¹"), (r"$\mathdefault{0.01}$", "0.01"), ("", ""), ("100", "100")])
def test_plain_log_label(label, plain):
    assert plots.plain_log_label(label) == plain


def test_log_axes_label_ticks_without_mathtext(task, drawn):
    """The KL (log x) and rank-shift (log y) histograms label their decades as plain text, at the decades."""
    superscript = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
    kl, _ = drawn(plots.kl_histogram_png, task["histograms"])
    rank, _ = drawn(plots.rank_shift_histogram_png, task["histograms"])
    axes = [kl.axes[0].xaxis, *(ax.yaxis for ax in rank.axes)]
    for axis in axes:
        labels = [(t.get_text(), loc) for t, loc in zip(axis.get_ticklabels(), axis.get_ticklocs()) if t.get_text()]
        assert labels, "a log axis without labels"
        for text, loc in labels:
            assert "$" not in text, text
            assert text.startswith("10") and 10.0 ** int(text[2:].translate(superscript)) == pytest.approx(loc), \
                (text, loc)
