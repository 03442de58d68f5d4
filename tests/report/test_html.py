"""report.html: one self-contained file, every data string escaped, one embedded PNG per drawable figure, every
table present without matplotlib, missing parts (no PCA, CKA None, NaN as None) shown instead of failing."""
from __future__ import annotations

import base64
import copy
import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from report_helpers import HOSTILE, MODELS, TASKS, block_import, expected_images, synthetic_summary

from driftscope.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str]:
    """The synthetic summary's report, drawn once for the module (matplotlib needed)."""
    pytest.importorskip("matplotlib", reason="matplotlib not installed: the report has no plots to check")
    out = tmp_path_factory.mktemp("report")
    path = write_report(out, synthetic_summary())
    return path, path.read_text(encoding="utf-8")


@pytest.fixture()
def no_matplotlib_html(tmp_path, monkeypatch) -> str:
    block_import(monkeypatch, "matplotlib")
    return write_report(tmp_path, synthetic_summary()).read_text(encoding="utf-8")


# ---- structure ------------------------------------------------------------------------------------------------
def test_one_self_contained_file(rendered):
    path, text = rendered
    assert path.name == "report.html"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"], "temp files left behind"
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text)
    external = [r for r in refs if not (r.startswith("#") or r.startswith("data:image/png;base64,"))]
    assert external == [], f"non-embedded references: {external[:5]}"
    for needle in ("<script", "<link", "@import", "url(", "<iframe", "<object"):
        assert needle not in text.lower(), f"{needle!r} in the report"


def test_image_count_and_every_png_decodes(rendered):
    _, text = rendered
    images = IMG_RE.findall(text)
    summary = synthetic_summary()
    assert len(images) == expected_images(summary) == 19  # 4 sections x 5 figures, one without PCA
    for i, b64 in enumerate(images):
        png = base64.b64decode(b64, validate=True)
        assert png.startswith(PNG_SIGNATURE), f"image {i} is not a PNG: {png[:8]!r}"
        assert png.endswith(b"IEND\xaeB`\x82"), f"image {i} is truncated (no IEND chunk at the end)"
    assert 'class="error"' not in text, "a figure failed to draw"


def test_every_model_and_task_named_and_sectioned(rendered):
    _, text = rendered
    for name in MODELS + TASKS:
        assert html.escape(name) in text, f"{name!r} missing"
    for i in range(len(MODELS) * len(TASKS)):
        assert f'<h2 id="s{i}">' in text and f'href="#s{i}"' in text


# ---- escaping -------------------------------------------------------------------------------------------------
def _without_images(text: str) -> str:
    return IMG_RE.sub('src="data:image/png;base64,"', text)


def test_hostile_text_only_escaped(rendered):
    text = _without_images(rendered[1])
    assert HOSTILE not in text and "<b>500</b>" not in text and "<think>" not in text
    assert html.escape(HOSTILE, quote=True) in text
    assert " &amp;amp; co" in text  # the token "&amp; co" shown literally
    assert "$x$" in text
    assert "↵↵" in text and "a\\x00b\\x1bc" in text and "⇥\\x0d" in text
    bad = sorted({hex(ord(c)) for c in text if ord(c) < 0x20 and c != "\n"})
    assert bad == [], f"raw control characters in the HTML: {bad}"


def test_header_paths_timing_extras_and_problems(rendered):
    text = _without_images(rendered[1])
    assert "Ran 16,000 tokens in 2.5 s (6,400 tokens/s)" in text
    assert "<h3>backends</h3>" in text and "driftscope._C &lt;OpenMP&gt;" in text
    assert "/ckpt/base&lt;1&gt;" in text and "/ckpt/rl&amp;v=1" in text
    assert "Problems (2)" in text and "Problems (1)" in text
    assert "2 problems (skipped records, non-finite results)" in text
    assert "/data/coqa.jsonl:3: &lt;missing &#x27;output&#x27;&gt;; record skipped" in text


# ---- missing parts --------------------------------------------------------------------------------------------
def test_missing_parts_are_said_not_failed(rendered):
    text = _without_images(rendered[1])
    assert text.count("No PCA shift in this run.") == 1
    assert text.count("CKA was not computed for this run.") == 1
    assert "—" in text  # NaN -> None -> em dash
    assert "nan" not in re.sub(r"<[^>]+>", "", text).lower().split()


def test_figure_failure_is_shown_and_warned(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed")
    summary = {"models": {"m": {"tasks": {"t": {"histograms": {"kl_tb": {"edges": [1e-3, 1e-2], "counts": [1]}}}}}}}
    with pytest.warns(UserWarning, match="KL histogram"):
        text = write_report(tmp_path, summary).read_text(encoding="utf-8")
    assert 'class="error"' in text and "len(counts) == len(edges) + 1" in text


def test_empty_summary_still_writes(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    text = write_report(tmp_path / "new" / "dir", {}).read_text(encoding="utf-8")
    assert "nothing was compared" in text


def test_no_matplotlib_has_tables_and_note(no_matplotlib_html):
    text = no_matplotlib_html
    assert "data:image" not in text
    assert "pip install matplotlib" in text
    assert text.count("Top shifted tokens (") == len(MODELS) * len(TASKS)
    assert html.escape(HOSTILE, quote=True) in text and HOSTILE not in text
    assert text.count("<h2 id=") == len(MODELS) * len(TASKS)


def test_no_matplotlib_same_tables_as_with(rendered, no_matplotlib_html):
    def tables(t: str) -> list[str]:
        return re.findall(r"<table>.*?</table>", t, flags=re.S)
    assert tables(no_matplotlib_html) == tables(rendered[1])


def test_importing_report_does_not_import_matplotlib_or_pyarrow():
    code = ("import sys, driftscope.report; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'pyarrow')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_summary_is_not_modified(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    summary = synthetic_summary()
    before = copy.deepcopy(summary)
    write_report(tmp_path, summary)
    assert summary == before


# ---- how to read it ---------------------------------------------------------------------------------------------
FIGURE_RE = re.compile(r'<figure><img [^>]*>\s*<figcaption>(.*?)</figcaption></figure>', flags=re.S)


def _shown_text(page: str) -> str:
    """What a reader sees: no tags (so no image data), entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style>.*?</style>", "", page, flags=re.S)))


def test_every_plot_has_a_caption(rendered):
    text = rendered[1]
    captions = FIGURE_RE.findall(text)
    assert len(captions) == text.count("<img ") == expected_images(synthetic_summary())
    short = [c for c in captions if len(_shown_text(c).split()) < 25]
    assert not short, f"captions too short to say how to read the plot: {short}"
    assert text.count("length is the centroid distance d = ") == 3  # one per PCA figure, with its number


def test_kl_caption_puts_the_mean_in_context(rendered):
    text = _shown_text(rendered[1])  # rl / coqa: KL(t‖b) token mean 0.05, base entropy 1.2 nats
    assert "KL is 0 where the two distributions are identical" in text
    assert ("KL(tuned ‖ base) averages 0.05 nats per token: tokens drawn from the tuned model are, in geometric "
            "mean, e^KL = 1.051× as likely under it as under the base.") in text
    assert "mean entropy) is 1.2 nats per token, 24× this KL." in text


def test_token_and_sample_means_explained(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    summary = synthetic_summary()
    tasks = summary["models"]["rl"]["tasks"]
    tasks["coqa"]["rank_shift"] = {"token_mean": 0.33, "sample_mean": -0.78}  # the demo's math task
    text = _shown_text(write_report(tmp_path, summary).read_text(encoding="utf-8"))
    from driftscope.report.html import MEANS_NOTE
    # under each model's overview table and each section's metrics table
    assert text.count(MEANS_NOTE) == len(MODELS) + len(MODELS) * len(TASKS)
    assert "In coqa, the rank shift's token mean (0.33) and sample mean (-0.78) have opposite signs: the tokens of " \
           "long responses moved up on net, the typical response down." in text
    assert text.count("have opposite signs") == 2  # overview and section, that task only (others agree in sign)


def test_displayed_text_says_principal_component(rendered):
    text = _shown_text(rendered[1])
    assert "principle" not in text.lower()  # the paper's typo, kept only in the JSON keys
    assert "pca m2 base" in text and "hidden state" in text


def test_wide_tables_scroll_instead_of_being_cut(rendered):
    text = rendered[1]
    assert re.search(r"\.tw\{overflow-x:auto", text)
    assert text.count("<table>") == text.count('<div class="tw"><table>') > 0


def test_figures_drawn_on_forked_processes_are_the_ones_drawn_here(tmp_path, monkeypatch):
    """The figures go to a pool of up to the usable cores (capped by torch's thread count): the same report, byte for
    byte, as drawn one at a time in this process; a failing figure is still shown and warned here."""
    import driftscope.report.html as report_html

    pytest.importorskip("matplotlib", reason="matplotlib not installed: the report has no plots to check")
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("no fork on this platform: the figures are drawn here")
    monkeypatch.setattr(report_html, "_cores", lambda: 1)
    here = write_report(tmp_path / "here", synthetic_summary()).read_text(encoding="utf-8")
    pools = []
    real = __import__("concurrent.futures").futures.ProcessPoolExecutor
    monkeypatch.setattr("concurrent.futures.ProcessPoolExecutor", lambda *a, **k: pools.append(a) or real(*a, **k))
    monkeypatch.setattr(report_html, "_cores", lambda: 3)
    forked = write_report(tmp_path / "forked", synthetic_summary()).read_text(encoding="utf-8")
    assert pools and pools[0][0] == 3
    assert re.sub(r"created [^<]*", "", forked) == re.sub(r"created [^<]*", "", here)
    broken = {"histograms": {"kl_tb": {"edges": [1e-3, 1e-2], "counts": [1]}}}  # two figures, both failing
    bad = {"models": {"m": {"tasks": {"t": broken, "u": broken}}}}
    with pytest.warns(UserWarning, match="KL histogram"):
        text = write_report(tmp_path / "bad", bad).read_text(encoding="utf-8")
    assert len(pools) == 2 and text.count('class="error"') == 2


def _stuck_in_a_child(parent: int) -> bytes:  # a figure job that never returns in a forked worker
    while os.getpid() != parent:
        time.sleep(1)
    return b"drawn here"


def _drawn(text: str) -> bytes:
    return text.encode()


def test_a_stuck_figure_process_is_killed_and_its_figures_drawn_here(monkeypatch):
    """A worker not done by the pool's deadline (a child forked while another thread held a lock can hang): every
    figure is drawn in this process, with a warning, and the pool's processes are killed, not waited for."""
    import multiprocessing

    import driftscope.report.html as report_html

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform: the figures are drawn here")
    monkeypatch.setattr(report_html, "_cores", lambda: 2)
    monkeypatch.setattr(report_html, "_pool_seconds", lambda n: 3.0)
    workers, abandon = [], report_html._abandon
    monkeypatch.setattr(report_html, "_abandon", lambda pool: workers.extend(pool._processes.values()) or abandon(pool))
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="drawn one at a time"):
        got = report_html._draw_all([(_stuck_in_a_child, (os.getpid(),), {}), (_drawn, ("ok",), {})])
    assert got == [b"drawn here", b"ok"]
    assert time.monotonic() - t0 < 30
    assert workers
    deadline = time.monotonic() + 15
    while not all(_ended(p.pid) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_ended(p.pid) for p in workers), [_ended(p.pid) for p in workers]


def _ended(pid: int) -> bool:
    """No process `pid`, or only its exit status left (a zombie): read from /proc, since which thread of this process
    reaps the pool's workers (the pool's own or this one) is a race that Process.is_alive() can lose."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_figure_processes_follow_the_thread_count(monkeypatch):
    import torch

    import driftscope.report.html as report_html

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert report_html._cores() == 1
    finally:
        torch.set_num_threads(before)
