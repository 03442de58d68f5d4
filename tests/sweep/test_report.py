"""The sweep report: every file written, labels escaped, PNGs valid, the tidy table equal to sweep.json's numbers,
None values as gaps, tables without matplotlib, 50 checkpoints, and a sweep built from real tiny drift runs."""
from __future__ import annotations

import builtins
import copy
import html
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import pytest

from driftscope.eval.ti import GROUPS, transferability_index
from driftscope.sweep_run import report as R
from driftscope.sweep_run.plots import OrdinalAxis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert('x')</script>"
TASKS = ("math", "chat & <b>code</b>")
N_STATES = 7


# ---- synthetic sweeps --------------------------------------------------------------------------------------------
def _block(d: float, *, cka: bool = True, pca: bool = True) -> dict:
    """A task block whose drift grows with d (0 = identical to the base)."""
    layers = [{"layer": i, "cosine": 1.0 - 0.1 * d * i / N_STATES, "rel_l2": 0.3 * d * i / N_STATES,
               "rel_l2_fro": 0.31 * d * i / N_STATES, "cka": (1.0 - 0.05 * d * i / N_STATES) if cka else None,
               "pca_shift": (-1) ** i * d * i if pca else None, "pca_principle_base": 0.5 if pca else None,
               "pca_principle_tuned": 0.5 + d if pca else None} for i in range(N_STATES)]
    return {"tokens": 1234, "samples": 17,
            "kl_tb": {"token_mean": 0.1 * d, "sample_mean": 0.11 * d}, "kl_bt": {"token_mean": 0.12 * d,
                                                                                 "sample_mean": 0.13 * d},
            "rank_shift": {"token_mean": 0.5 * d, "sample_mean": 0.4 * d}, "sampled_kl": 0.05 * d,
            "top1_agreement": 1.0 - 0.2 * d, "entropy_base": {"token_mean": 2.0, "sample_mean": 2.1},
            "entropy_tuned": {"token_mean": 2.0 - 0.5 * d, "sample_mean": 2.1 - 0.5 * d},
            "layers": layers,
            "pca": {"mode": "streaming", "centroid_distance": 3.0 * d, "records": []} if pca else None,
            "llama_cpp": {"tokens": 1234, "ppl_q": 10.0 + d}, "histograms": {},
            "shifted_tokens": {"tokens": 1234, "shifted": int(1000 * d), "top": []}, "problems": []}


def _lens(d: float, indices=(0, 2, 4, 6)) -> dict:
    """summary.json's lens keys for a block whose lens drift grows with d and with depth (--lens every:2)."""
    def row(i: int, s: float) -> dict:
        x = s * d * i / (N_STATES - 1)
        return {"index": i, "tokens": 1234, "samples": 17, "kl_tb": {"token_mean": 0.1 * x, "sample_mean": 0.11 * x},
                "kl_bt": {"token_mean": 0.12 * x, "sample_mean": None}, "rank_shift": {"token_mean": 0.5 * x,
                                                                                      "sample_mean": 0.4 * x},
                "sampled_kl": 0.05 * x, "top1_agreement": 1.0 - 0.2 * x}
    return {"lens": [row(i, 1.0) for i in indices],
            "self_lens": {"base": [row(i, 2.0) for i in indices], "tuned": [row(i, 3.0) for i in indices]},
            "promoted_tokens": None, "examples": {"samples": [], "tokens": []}}


def _scores(d: float) -> dict:
    return {b: min(100.0, 40.0 + {"math": 30, "other": 10, "non": -5}[g] * d + j)
            for g, group in GROUPS.items() for j, b in enumerate(group)}


def synthetic_sweep(k: int = 5, *, ordinals: bool = True, with_eval: bool = True, lens: bool = False) -> dict:
    ckpts = []
    for i in range(k):
        d = (i + 1) / k
        tasks = {TASKS[0]: _block(d), TASKS[1]: _block(d, cka=False, pca=i % 2 == 0)}
        if lens:  # the first task only: a task without lens keeps its other figures
            tasks[TASKS[0]] |= _lens(d)
        ckpts.append({"label": f"step-{20 * (i + 1)}", "path": f"/runs/ckpt-{20 * (i + 1)}", "kind": "hf",
                      "ordinal": 20 * (i + 1) if ordinals else None, "pass": f"p{i // 4}", "tasks": tasks,
                      "rank_shift_mean_of_task_means": 0.5 * d, "scores": _scores(d) if with_eval else None})
    base = {b: s - 0.0 for b, s in _scores(0.0).items()}
    ev = {"base": base, "ti": {c["label"]: transferability_index(base, c["scores"]).to_dict() for c in ckpts[1:]}
          } if with_eval else None
    return {"driftscope_version": "0.1", "created": "2026-12-06T18:00:00Z", "manifest": "/runs/sweep.yaml",
            "ordinal": "step", "base": {"path": "/runs/base", "kind": "hf"},
            "data": {TASKS[0]: "/data/math.jsonl", TASKS[1]: "/data/chat.jsonl"},
            "options": {"pca": "streaming", "max_batch_tokens": 512}, "checkpoints": ckpts,
            "eval": ev,
            "passes": [{"id": f"p{j}", "labels": [c["label"] for c in ckpts[4 * j:4 * j + 4]], "seconds": 1.5,
                        "summary": None} for j in range(math.ceil(k / 4))],
            "timing": {"seconds": 3.0, "base_passes": math.ceil(k / 4), "checkpoints": k, "computed_now": k}}


def block_import(monkeypatch, package: str) -> None:
    real = builtins.__import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == package or name.startswith(package + ".")):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return real(name, globals, locals, fromlist, level)
    monkeypatch.setattr(builtins, "__import__", fake)


def _lookup(sweep: dict, row: dict):
    """The number in sweep.json that a tidy-table row stands for (an independent walk of the documented layout)."""
    if row["label"] is None:
        return sweep["eval"]["base"][row["metric"].removeprefix("score.")]
    c = sweep["checkpoints"][row["position"]]
    m = row["metric"]
    if row["task"] is None:
        if m.startswith("score."):
            return c["scores"][m[6:]]
        if m.startswith("ti."):
            ti = sweep["eval"]["ti"].get(c["label"]) or transferability_index(sweep["eval"]["base"],
                                                                              c["scores"]).to_dict()
            return ti["gains"][m[9:]] if m.startswith("ti.gains.") else ti[m[3:]]
        return c[m]
    block = c["tasks"][row["task"]]
    if m.startswith(("lens.", "self_lens.")):  # lens.<key>[.<mean>], self_lens.<who>.<key>[.<mean>]
        parts = m.split(".")
        rows = block["lens"] if parts[0] == "lens" else block["self_lens"][parts[1]]
        entry = next(r for r in rows if r["index"] == row["layer"])
        keys = parts[1:] if parts[0] == "lens" else parts[2:]
        return entry[keys[0]] if len(keys) == 1 else entry[keys[0]][keys[1]]
    if row["layer"] is not None:
        return next(r for r in block["layers"] if r["layer"] == row["layer"])[m]
    return block[m] if "." not in m else block[m.split(".")[0]][m.split(".", 1)[1]]


def _images(text: str) -> list[bytes]:
    import base64
    return [base64.b64decode(s) for s in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("sweep")
    sweep = synthetic_sweep(5)
    sweep["checkpoints"][2]["label"] = HOSTILE
    sweep["checkpoints"][2]["tasks"][TASKS[0]]["sampled_kl"] = None
    return sweep, out, R.write_report(sweep, out)


# ---- files ----------------------------------------------------------------------------------------------------
def test_every_file_written_and_nothing_else(written):
    sweep, out, files = written
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(files), (sorted(on_disk), sorted(files))
    assert {"sweep.html", "sweep.parquet"} <= set(files)
    pngs = [k for k in files if k.endswith(".png")]
    assert len(pngs) == 2 * len(TASKS) + 2  # metrics + heat map per task, scores + TI
    for name in pngs:
        data = files[name].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert sorted(_images(page)) == sorted(files[n].read_bytes() for n in pngs)  # the same PNGs, embedded


def test_html_escapes_labels_and_is_self_contained(written):
    _, _, files = written
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert html.escape(HOSTILE, quote=True) in page
    assert "&lt;b&gt;code&lt;/b&gt;" in page and "<b>code</b>" not in page
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # no external resource
    assert page.count("<figcaption>") == page.count("<img ")  # a caption under every plot
    assert page.count("1,234 scored tokens in 17 samples") == 2 * len(TASKS)  # the counts in each task's captions


def test_table_round_trips_to_sweep_json(written):
    sweep, _, files = written
    rows = R.read_table(files["sweep.parquet"])
    assert rows and all(list(r) == list(R.TABLE_COLUMNS) for r in rows)
    keys = [(r["position"], r["task"], r["metric"], r["layer"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per checkpoint x task x metric (x layer)
    for r in rows:
        want = _lookup(sweep, r)
        assert (r["value"] is None and want is None) or r["value"] == pytest.approx(want, rel=1e-15), r
        c = sweep["checkpoints"][r["position"]] if r["position"] is not None else {"kind": "base"}
        assert (r["label"], r["ordinal"], r["kind"]) == (c.get("label"), c.get("ordinal"), c["kind"]), r
    got = {(r["position"], r["task"], r["metric"], r["layer"]) for r in rows}
    c0 = sweep["checkpoints"][0]
    for layer in range(N_STATES):
        assert (0, TASKS[0], "cka", layer) in got and (0, TASKS[0], "pca_shift", layer) in got
    for m in ("kl_tb.token_mean", "kl_bt.sample_mean", "sampled_kl", "top1_agreement", "pca.centroid_distance",
              "tokens", "entropy_tuned.token_mean", "llama_cpp.ppl_q", "shifted_tokens.shifted"):
        assert (0, TASKS[0], m, None) in got, m
    assert {(0, None, f"score.{b}", None) for b in c0["scores"]} <= got
    assert (0, None, "ti.ti_other", None) in got  # checkpoint 0 has no TI in eval.ti: computed from its scores
    assert sum(r["label"] is None for r in rows) == len(sweep["eval"]["base"])


def test_jsonl_without_pyarrow_same_rows(written, tmp_path, monkeypatch):
    sweep, _, files = written
    want = R.read_table(files["sweep.parquet"])
    block_import(monkeypatch, "pyarrow")
    block_import(monkeypatch, "matplotlib")
    (tmp_path / "sweep.parquet").write_bytes(b"stale")
    got = R.write_report(sweep, tmp_path)
    assert set(got) == {"sweep.html", "sweep.jsonl"} and not (tmp_path / "sweep.parquet").exists()
    assert R.read_table(got["sweep.jsonl"]) == want


def test_no_matplotlib_tables_only_with_note(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    sweep = synthetic_sweep(5)
    files = R.write_report(sweep, tmp_path)
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert "<img" not in page and "pip install matplotlib" in page
    assert not (tmp_path / R.PLOTS_DIR).exists() or not list((tmp_path / R.PLOTS_DIR).iterdir())
    for c in sweep["checkpoints"]:  # every checkpoint's numbers are in the tables
        assert f">{c['label']}<" in page
        assert f'{c["tasks"][TASKS[0]]["kl_tb"]["token_mean"]:.4g}' in page


# ---- missing values, ordinals, size ---------------------------------------------------------------------------
def test_missing_metrics_are_gaps_not_crashes(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = synthetic_sweep(6)
    c = sweep["checkpoints"]
    c[1]["tasks"][TASKS[0]] = {k: None for k in c[1]["tasks"][TASKS[0]]}  # every metric None
    del c[2]["tasks"][TASKS[1]]  # a checkpoint without this task
    c[3]["tasks"][TASKS[0]]["layers"] = []  # no layers
    c[3]["scores"] = None
    for block in (c[i]["tasks"].get(TASKS[1]) for i in range(6)):
        if block:
            block["pca"], block["top1_agreement"] = None, None  # a metric missing everywhere: "not computed"
    sweep["eval"]["ti"] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no figure failed, nothing was warned about
        files = R.write_report(sweep, tmp_path)
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert 'class="error"' not in page
    assert len([f for f in files if f.endswith(".png")]) == 2 * len(TASKS) + 2
    rows = R.read_table(files["sweep.parquet"])
    one = {r["metric"]: r["value"] for r in rows if r["position"] == 1 and r["task"] == TASKS[0]}
    assert one == {"tokens": None, "samples": None, "sampled_kl": None, "top1_agreement": None}  # None: null rows
    pca = [r for r in rows if r["task"] == TASKS[1] and r["metric"].startswith("pca.")]
    assert pca == []  # a None section (no PCA): no rows
    assert not any(r["position"] == 2 and r["task"] == TASKS[1] for r in rows)


def test_checkpoints_without_ordinal_are_placed_by_order_and_said(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    sweep = synthetic_sweep(4)
    sweep["checkpoints"][1]["ordinal"] = None
    page = R.write_report(sweep, tmp_path)["sweep.html"].read_text(encoding="utf-8")
    assert "1 of 4 checkpoints have no step" in page
    axis = OrdinalAxis.of(sweep["checkpoints"], "step")
    assert not axis.numeric and axis.xs == [0.0, 1.0, 2.0, 3.0] and axis.tick_text(1) == "step-40"
    full = OrdinalAxis.of(synthetic_sweep(4)["checkpoints"], "step")
    assert full.numeric and full.xs == [20.0, 40.0, 60.0, 80.0] and full.note is None


def test_fifty_checkpoints_render(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    sweep = synthetic_sweep(50)
    files = R.write_report(sweep, tmp_path)
    for name, path in files.items():
        if name.endswith(".png"):
            w, h = Image.open(path).size
            assert 600 < w < 2200 and h < 1600, (name, w, h)  # the width grows modestly with 50 checkpoints
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert all(f">step-{20 * i}<" in page for i in range(1, 51))


def test_sweep_not_modified(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    sweep = synthetic_sweep(3)
    before = copy.deepcopy(sweep)
    R.write_report(sweep, tmp_path)
    assert sweep == before


# ---- from real drift runs -----------------------------------------------------------------------------------------
def _real_sweep(root: Path) -> dict:
    """3 checkpoints of growing noise against one tiny base, each a separate drift run; their summary.json task
    blocks are the sweep's, as sweep.json holds them."""
    import torch
    from safetensors.torch import load_file

    from driftscope import drift
    from driftscope.engine.tokenizer import load_tokenizer
    from driftscope.testing import random_checkpoint, write_checkpoint, write_tokenizer
    from driftscope.util import write_jsonl

    texts = [f"The number {i} plus {i + 3} equals {2 * i + 3}, said the teacher." for i in range(24)]
    base = root / "base"
    write_tokenizer(base, texts, vocab_size=300)
    cfg = random_checkpoint(base, vocab_size=load_tokenizer(base).vocab_size, hidden_size=32, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=64, tie=False, seed=0)
    state = load_file(str(base / "model.safetensors"))
    data = {"arith": write_jsonl(root / "arith.jsonl", [{"prompt": "Add.", "response": t} for t in texts[:8]]),
            "more": write_jsonl(root / "more.jsonl", [{"prompt": "Again.", "response": t} for t in texts[8:14]])}
    ckpts = []
    for k, noise in enumerate((0.1, 0.3, 0.6)):
        g = torch.Generator().manual_seed(k + 1)
        sd = {n: w + noise * w.std() * torch.randn(w.shape, generator=g) if w.dim() == 2 else w
              for n, w in state.items()}
        path = write_checkpoint(root / f"step{k}", cfg, sd)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(base / f, path / f)
        summary = drift(base, path, list(data.values()), None, progress=False, pca="streaming",
                        max_batch_tokens=256).summary
        (model,) = summary["models"].values()
        ckpts.append({"label": f"step{k}", "path": str(path), "kind": "hf", "ordinal": 100 * (k + 1), "pass": "p0",
                      "tasks": model["tasks"], "scores": None,
                      "rank_shift_mean_of_task_means": model["rank_shift_mean_of_task_means"]})
    return {"driftscope_version": "0.1", "created": "now", "manifest": str(root / "m.json"), "ordinal": "step",
            "base": {"path": str(base), "kind": "hf"}, "data": {t: str(p) for t, p in data.items()},
            "options": {"pca": "streaming"}, "checkpoints": ckpts, "eval": None,
            "passes": [{"id": "p0", "labels": ["step0", "step1", "step2"], "seconds": 0.3, "summary": None}],
            "timing": {"seconds": 0.3, "base_passes": 1, "checkpoints": 3, "computed_now": 3}}


def test_real_drift_runs(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = json.loads(json.dumps(_real_sweep(tmp_path / "m")))  # as read back from sweep.json
    files = R.write_report(sweep, tmp_path / "out")
    assert set(files) == {"sweep.html", "sweep.parquet"} | {f"{R.PLOTS_DIR}/{n}.png" for n in
                                                          ("00-arith-metrics", "00-arith-layers", "01-more-metrics",
                                                           "01-more-layers")}
    rows = R.read_table(files["sweep.parquet"])
    for r in rows:
        want = _lookup(sweep, r)
        assert (r["value"] is None and want is None) or r["value"] == pytest.approx(want, rel=1e-15), r
    kl = [r["value"] for r in rows if r["task"] == "arith" and r["metric"] == "kl_tb.token_mean"]
    assert len(kl) == 3 and kl == sorted(kl)  # noise grows with the step, and so does KL
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert 'class="error"' not in page and page.count("<img ") == 4


def test_failed_figure_is_shown_and_the_rest_written(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from driftscope.sweep_run import plots

    def broken(*args, **kwargs):
        raise RuntimeError("<boom>")
    monkeypatch.setattr(plots, "heatmap_png", broken)
    monkeypatch.setattr(plots, "metrics_png", lambda *args, **kwargs: PNG_MAGIC + b"stub")
    sweep = synthetic_sweep(3, with_eval=False)
    with pytest.warns(UserWarning, match="<boom>"):
        files = R.write_report(sweep, tmp_path)
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert page.count('class="error"') == len(TASKS) and "&lt;boom&gt;" in page
    assert sorted(n for n in files if n.endswith(".png")) == [f"{R.PLOTS_DIR}/00-math-metrics.png",
                                                            f"{R.PLOTS_DIR}/01-chat_b_code_b-metrics.png"]


def test_rewrite_removes_pngs_it_no_longer_draws(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from driftscope.sweep_run import plots
    for name in ("metrics_png", "heatmap_png"):  # the files are the subject here, not the drawing
        monkeypatch.setattr(plots, name, lambda *args, **kwargs: PNG_MAGIC + b"stub")
    sweep = synthetic_sweep(3, with_eval=False)
    first = R.write_report(sweep, tmp_path)
    for c in sweep["checkpoints"]:
        del c["tasks"][TASKS[1]]
    del sweep["data"][TASKS[1]]
    second = R.write_report(sweep, tmp_path)
    assert len([n for n in first if n.endswith(".png")]) == 4
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == set(second)
    assert sorted(n for n in second if n.endswith(".png")) == [f"{R.PLOTS_DIR}/00-math-layers.png",
                                                             f"{R.PLOTS_DIR}/00-math-metrics.png"]


def test_scores_that_give_no_ti_are_a_note(tmp_path, monkeypatch):
    block_import(monkeypatch, "matplotlib")
    sweep = synthetic_sweep(3)
    sweep["eval"]["ti"] = None
    sweep["checkpoints"][1]["scores"]["aime24"] = 250.0  # not a percentage: transferability_index refuses it
    page = R.write_report(sweep, tmp_path)["sweep.html"].read_text(encoding="utf-8")
    assert "no TI for checkpoint &#x27;step-40&#x27;" in page and "is not a percentage" in page
    ti = {r["label"]: r["value"] for r in R.read_table(tmp_path / "sweep.parquet") if r["metric"] == "ti.ti_other"}
    want = transferability_index(sweep["eval"]["base"], sweep["checkpoints"][0]["scores"]).ti_other
    assert set(ti) == {"step-20", "step-60"} and ti["step-20"] == want


# ---- the logit lens ([15]) ----------------------------------------------------------------------------------------
LENS_METRICS = {"tokens", "samples", "kl_tb.token_mean", "kl_tb.sample_mean", "kl_bt.token_mean", "kl_bt.sample_mean",
                "rank_shift.token_mean", "rank_shift.sample_mean", "sampled_kl", "top1_agreement"}


def test_lens_heat_map_and_table_rows(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = synthetic_sweep(4, lens=True)
    files = R.write_report(sweep, tmp_path)
    pngs = sorted(n for n in files if n.endswith(".png"))
    assert len(pngs) == 2 * len(TASKS) + 2 + 1 and f"{R.PLOTS_DIR}/00-math-lens.png" in pngs  # only the lens task
    assert files[f"{R.PLOTS_DIR}/00-math-lens.png"].read_bytes().startswith(PNG_MAGIC)
    page = files["sweep.html"].read_text(encoding="utf-8")
    assert page.count("Logit-lens drift per hidden-state index") == 1 and 'class="error"' not in page
    assert page.count("<figcaption>") == page.count("<img ") == len(pngs)
    rows = R.read_table(files["sweep.parquet"])
    for r in rows:
        want = _lookup(sweep, r)
        assert (r["value"] is None and want is None) or r["value"] == pytest.approx(want, rel=1e-15), r
    lens = {(r["position"], r["task"], r["metric"], r["layer"]) for r in rows if r["metric"].startswith("lens.")}
    assert lens == {(p, TASKS[0], f"lens.{m}", i) for p in range(4) for m in LENS_METRICS for i in (0, 2, 4, 6)}
    for who in ("base", "tuned"):
        got = {(r["metric"], r["layer"]) for r in rows
               if r["position"] == 3 and r["metric"].startswith(f"self_lens.{who}.")}
        assert got == {(f"self_lens.{who}.{m}", i) for m in LENS_METRICS for i in (0, 2, 4, 6)}
    assert not any(r["metric"].startswith(("promoted", "examples")) for r in rows)  # lists, not numbers: no rows
    kl = [r["value"] for r in rows if r["metric"] == "lens.kl_bt.token_mean" and r["layer"] == 6]
    assert kl == sorted(kl) and kl[0] > 0  # grows with the checkpoint


def test_lens_heat_map_matrix_has_grey_rows_where_no_index():
    from driftscope.sweep_run import plots
    sweep = synthetic_sweep(3, lens=True)
    blocks = [c["tasks"][TASKS[0]] for c in sweep["checkpoints"]]
    blocks[1] = None  # a checkpoint without the task
    blocks.append({"lens": None})  # a checkpoint run without --lens
    layers, values = plots._matrix(blocks, "kl_bt.token_mean", "lens", "index")
    assert layers == list(range(N_STATES))  # every index from 0 to L, so each row is one index tall
    for i, row in zip(layers, values):
        for j, v in enumerate(row):
            want = None if blocks[j] is None or i % 2 else next(
                (r["kl_bt"]["token_mean"] for r in blocks[j].get("lens") or [] if r["index"] == i), None)
            assert (math.isnan(v) and want is None) or v == want, (i, j, v, want)
    assert plots._matrix([None, {"lens": []}], "top1_agreement", "lens", "index") == ([], [])


def test_real_sweep_with_lens_every_2(tmp_path, monkeypatch):
    """driftscope.sweep over 2 checkpoints with lens="every:2" in the manifest: the lens heat map per task and its
    rows in sweep.parquet, equal to sweep.json's lens numbers."""
    pytest.importorskip("matplotlib")
    import driftscope
    import driftscope.report
    from sweep_helpers import manifest, write_run

    monkeypatch.setattr(driftscope.report, "write_report", lambda out, summary: Path(out) / "report.html")
    run = write_run(tmp_path / "run")
    items = [{"path": str(c), "label": c.name, "step": int(c.name.split("-")[1])} for c in run["checkpoints"][:2]]
    m = manifest(run, tmp_path / "m.json", checkpoints=items, lens="every:2", pca="none")
    rep = driftscope.sweep(m, tmp_path / "out")
    sweep = json.loads((rep.out / "sweep.json").read_text())
    assert sweep["options"]["lens"] == "every:2"
    tasks = list(sweep["data"])
    assert {f"{R.PLOTS_DIR}/{R._slug(i, t)}-lens.png" for i, t in enumerate(tasks)} <= set(rep.files)
    page = rep.files["sweep.html"].read_text(encoding="utf-8")
    assert page.count("Logit-lens drift per hidden-state index") == len(tasks)
    assert 'class="error"' not in page
    rows = R.read_table(rep.files["sweep.parquet"])
    lens = [r for r in rows if r["metric"] == "lens.kl_bt.token_mean"]
    assert sorted({r["layer"] for r in lens}) == [0, 2]  # 2 layers: states 0, 1, 2; every:2 chooses 0 and 2
    assert len(lens) == 2 * len(tasks) * 2
    for r in rows:
        want = _lookup(sweep, r)
        assert (r["value"] is None and want is None) or r["value"] == pytest.approx(want, rel=1e-15), r
    for c in sweep["checkpoints"]:  # the lens at L is the output probe, so its numbers are the task's
        for t in tasks:
            assert c["tasks"][t]["lens"][-1]["kl_bt"] == c["tasks"][t]["kl_bt"]
