"""Plot functions: PNG bytes for full and partial inputs, named errors for unusable ones, mathtext-safe labels,
readable histogram bin labels."""
from __future__ import annotations

import pytest
from report_helpers import block_import, synthetic_summary

from driftscope.probes.token_metrics import RANK_EDGES, RANK_SHIFT_EDGES
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
