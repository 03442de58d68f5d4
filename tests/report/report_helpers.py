"""A synthetic drift-run summary with the shape the runner writes: 2 models x 2 tasks, hostile token texts,
one task without PCA/CKA, one with NaN -> None values, one with skipped-record problems."""
from __future__ import annotations

import numpy as np

from driftscope.probes.token_metrics import KL_EDGES, RANK_EDGES, RANK_SHIFT_EDGES

MODELS = ("rl", "sft-<think>")
TASKS = ("coqa", "math & <b>500</b>")
N_LAYERS = 9  # L + 1: embeddings + 8 blocks
HOSTILE = "<script>alert('x')</script>"
TOKEN_TEXTS = [HOSTILE, " &amp; co", "$x$", "\n\n", " the", "中文", "a\x00b\x1bc", "é🙂", "\t\r", "$", "</td>", ""]


def _hist(values: np.ndarray, edges) -> dict:
    idx = np.searchsorted(np.asarray(edges), values, side="right")
    return {"edges": list(edges), "counts": np.bincount(idx, minlength=len(edges) + 1).tolist()}


def _histograms(rng: np.random.Generator, scale: float) -> dict:
    kl = np.exp(rng.normal(np.log(scale), 2.5, 4000))
    kl[:200] = 0.0  # exact zeros land in the first (< edges[0]) bin
    kl[200:210] = 500.0  # beyond the last edge
    shift = np.rint(rng.standard_cauchy(4000) * 2).astype(np.int64)
    shift[:1500] = 0
    top = np.ceil(np.exp(rng.exponential(1.2, 4000))).astype(np.int64)
    return {"kl_tb": _hist(kl, KL_EDGES), "kl_bt": _hist(kl * 1.7, KL_EDGES),
            "rank_shift": _hist(shift, RANK_SHIFT_EDGES), "rank_shift_top": _hist(top, RANK_EDGES)}


def _pca(rng: np.random.Generator, drift: float) -> dict:
    recs = []
    for layer in range(N_LAYERS):
        p = float(np.sin(layer / 3.0) * 20 + layer)
        recs.append({"layer": layer, "state": "Original", "shift": 0.0, "principle": p})
        recs.append({"layer": layer, "state": "Updated", "shift": drift * layer ** 1.5 + float(rng.normal()),
                     "principle": p + drift * layer})
    return {"mode": "streaming", "records": recs, "centroid_distance": 12.5 * drift}


def _layers(with_cka: bool, with_pca: bool) -> list[dict]:
    rows = []
    for i in range(N_LAYERS):
        rows.append({"layer": i, "cosine": 1.0 - 0.01 * i ** 1.3, "rel_l2": 0.02 * i ** 1.2,
                     "cka": (1.0 - 0.02 * i) if with_cka else None,
                     "pca_shift": float(i) if with_pca else None,
                     "pca_principle_base": 1.0 if with_pca else None, "pca_principle_tuned": 2.0 if with_pca else None})
    return rows


def _top(rng: np.random.Generator) -> list[dict]:
    rows = []
    for j, text in enumerate(TOKEN_TEXTS * 2):  # 24 rows: more than the plot's 20
        count = int(rng.integers(50, 500))
        shifted = int(count * rng.uniform(0.1, 0.9))
        rows.append({"id": 1000 + j, "text": text, "count": count, "count_shifted": shifted,
                     "frac_shifted": shifted / count, "mean_shift": float(rng.normal()),
                     "mean_abs_shift": float(rng.uniform(1, 5))})
    rows[-1]["text"] = None  # no decoder
    rows.sort(key=lambda r: -r["count_shifted"])
    return rows


def _task(rng: np.random.Generator, *, drift: float, with_pca: bool = True, with_cka: bool = True,
          nan: bool = False) -> dict:
    top = _top(rng)
    return {
        "tokens": 4000, "samples": 37,
        "kl_tb": {"token_mean": 0.05 * drift, "sample_mean": None if nan else 0.06 * drift},
        "kl_bt": {"token_mean": 0.08 * drift, "sample_mean": 0.09 * drift},
        "sampled_kl": None if nan else 0.02 * drift,
        "rank_shift": {"token_mean": 0.3 * drift, "sample_mean": None if nan else 0.25},
        "top1_agreement": 0.93,
        "entropy_base": {"token_mean": 1.2, "sample_mean": 1.3},
        "entropy_tuned": {"token_mean": None if nan else 0.9, "sample_mean": 1.0},
        "layers": _layers(with_cka, with_pca),
        "pca": _pca(rng, drift) if with_pca else None,
        "histograms": _histograms(rng, 0.01 * drift),
        "shifted_tokens": {"tokens": 4000, "shifted": sum(r["count_shifted"] for r in top),
                           "distinct_shifted": len(top), "top": top},
        "problems": [],
    }


def synthetic_summary(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    models = {}
    for m, model in enumerate(MODELS):
        tasks = {TASKS[0]: _task(rng, drift=1.0 + m), TASKS[1]: _task(rng, drift=2.0 + m)}
        models[model] = {"path": f"/ckpt/{model}&v=1", "rank_shift_mean_of_task_means": 0.5 + m, "tasks": tasks}
    rl, sft = models[MODELS[0]]["tasks"], models[MODELS[1]]["tasks"]
    rl[TASKS[1]] = _task(rng, drift=2.0, with_pca=False, with_cka=False)
    sft[TASKS[0]] = _task(rng, drift=1.5, nan=True)
    problems = [f"/data/coqa.jsonl:{i}: <missing 'output'>; record skipped" for i in (3, 17)]
    sft[TASKS[0]]["problems"] = problems
    rl[TASKS[0]]["problems"] = problems[:1]  # the same file, seen by both models: counted once in the header
    return {
        "driftscope_version": "0.1.0", "created": "2026-11-25T12:00:00Z",
        "config": {"base": "/ckpt/base<1>", "tuned": {m: models[m]["path"] for m in MODELS},
                   "data": {TASKS[0]: "/data/coqa.jsonl", TASKS[1]: "/data/math500.jsonl"},
                   "max_batch_tokens": 8192, "pca": "streaming"},
        "versions": {"python": "3.11.2", "torch": "2.5.0"},
        "machine": {"cpu": "Test CPU", "gpu": None},
        "gpu_telemetry": None,
        "backends": {"cpp": {"available": True, "reason": "driftscope._C <OpenMP>"}},
        "timing": {"seconds": 2.5, "tokens": 16000, "tokens_per_s": 6400.0},
        "models": models,
    }


def expected_images(summary: dict) -> int:
    """Figures write_report draws for `summary`: per section PCA (if records), layers, KL, rank shift, top tokens."""
    n = 0
    for model in summary["models"].values():
        for t in model["tasks"].values():
            n += bool(t.get("pca") and t["pca"].get("records"))
            n += bool(t.get("layers"))
            n += bool(t.get("histograms", {}).get("kl_tb") or t.get("histograms", {}).get("kl_bt"))
            n += bool(t.get("histograms", {}).get("rank_shift") or t.get("histograms", {}).get("rank_shift_top"))
            n += bool(t.get("shifted_tokens", {}).get("top"))
    return n


def block_import(monkeypatch, package: str) -> None:
    """Make `import package` (and its submodules) raise ImportError, as if it were not installed."""
    import builtins
    real = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == package or name.startswith(package + ".")):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return real(name, globals, locals, fromlist, level)
    monkeypatch.setattr(builtins, "__import__", fake_import)
