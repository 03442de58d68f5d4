"""ti.html as a reader sees it: the figure has a caption saying how to read it, and Table 1 (19 columns) is never
cut at the page's width: it sits in a horizontally scrolling box, set compact enough to fit a 1150 px page."""
from __future__ import annotations

import html
import re

import pytest

from driftscope.eval.ti import BENCHMARKS, transferability_indices
from driftscope.eval.ti_report import write_scatter

BASE = dict.fromkeys(BENCHMARKS, 40.0)
TUNED = {"rl": {**BASE, "aime24": 60.0, "gpqa_diamond": 50.0, "coqa": 30.0},
         "a-tuned-model-with-a-long-name": {**BASE, "aime24": 50.0, "coqa": 45.0}}


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    pytest.importorskip("matplotlib", reason="matplotlib not installed: ti.html has no figure")
    out = tmp_path_factory.mktemp("ti")
    files = write_scatter(out, "base", BASE, TUNED, transferability_indices(BASE, TUNED))
    return files["html"].read_text(encoding="utf-8")


def test_figure_has_a_caption(page):
    captions = re.findall(r"<figure><img [^>]*>\s*<figcaption>(.*?)</figcaption></figure>", page, flags=re.S)
    assert len(captions) == page.count("<img ") == 1
    caption = html.unescape(captions[0])
    assert "x: TI_other, y: TI_non" in caption and "100 = the math gain carried over in full" in caption


def test_table_scrolls_instead_of_being_cut(page):
    style = re.search(r"<style>(.*?)</style>", page, flags=re.S).group(1)
    assert ".tw{overflow-x:auto" in style and "table{font-size:.8em}" in style
    assert page.count("<table>") == page.count('<div class="tw"><table>') == 1
    assert "TI_other" in page and "a-tuned-model-with-a-long-name" in page
