"""A tiny base, a series of checkpoints base + t·noise (one noise direction, t growing), records and manifests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from json_helpers import leaves

from driftscope.engine.config import ModelConfig
from driftscope.engine.tokenizer import load_tokenizer
from driftscope.testing import hf_config, random_state_dict, write_checkpoint, write_tokenizer

TEXTS = [
    "Let x be a real number such that 3x + 7 = 22. Subtracting 7 from both sides gives 3x = 15, so x = 5.",
    "The sum of the first n positive integers is n(n + 1)/2, so the sum of 1 through 100 is 5050.",
    "A triangle with sides 3, 4 and 5 is a right triangle because 9 + 16 = 25.",
    "If a fair die is rolled twice, the probability that both rolls show six is 1/36.",
    "The museum opens at nine in the morning and closes at five in the afternoon on weekdays.",
    "She packed an umbrella because the forecast said it would rain in the evening.",
    "Rivers carry sediment downstream and deposit it where the water slows near the coast.",
    "Bread rises because yeast ferments sugar and releases carbon dioxide into the dough.",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STEPS = (10, 20, 30, 40, 50)  # checkpoint t = step / 100


def write_base(root: Path) -> tuple[Path, dict]:
    """A 2-layer Qwen3 with peaked random weights; returns its folder and state dict."""
    write_tokenizer(root, TEXTS, vocab_size=300)
    vocab = load_tokenizer(root).vocab_size
    cfg = hf_config("qwen3", vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)
    state = random_state_dict(ModelConfig.from_dict(cfg, source="test"), seed=0, std=0.15)
    write_checkpoint(root, cfg, state)
    return root, state


def write_step(base: Path, state: dict, out: Path, t: float, seed: int = 7) -> Path:
    """base + t·noise on every matrix (the same noise for every t: distance from the base grows with t)."""
    g = torch.Generator().manual_seed(seed)
    noisy = {}
    for name in sorted(state):
        w = state[name]
        n = torch.randn(w.shape, generator=g)
        noisy[name] = w + t * w.std() * n if w.dim() == 2 else w
    write_checkpoint(out, json.loads((base / "config.json").read_text()), noisy)
    for f in TOKENIZER_FILES:
        shutil.copy(base / f, out / f)
    return out


def write_records(path: Path, n: int = 8) -> Path:
    rows = [{"prompt": TEXTS[i % len(TEXTS)][:30], "response": TEXTS[(i + 3) % len(TEXTS)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_run(root: Path) -> dict:
    """base/, run/checkpoint-<step>/ for STEPS, data/a.jsonl, data/b.jsonl."""
    base, state = write_base(root / "base")
    ckpts = [write_step(base, state, root / "run" / f"checkpoint-{s}", s / 100) for s in STEPS]
    (root / "data").mkdir()
    data = [write_records(root / "data" / "a.jsonl"), write_records(root / "data" / "b.jsonl", n=5)]
    return {"base": base, "state": state, "checkpoints": ckpts, "data": data, "root": root}


def manifest(run: dict, path: Path, checkpoints=None, **extra) -> Path:
    """A manifest file at `path` (relative paths from its folder), JSON."""
    def rel(p) -> str:
        return str(Path(p).relative_to(path.parent)) if Path(p).is_relative_to(path.parent) else str(p)

    items = checkpoints if checkpoints is not None else [
        {"path": rel(c), "label": c.name, "step": int(c.name.split("-")[1])} for c in run["checkpoints"]]
    body = {"base": rel(run["base"]), "checkpoints": items, "data": [rel(d) for d in run["data"]],
            "max_batch_tokens": 64, "progress": False, **extra}
    path.write_text(json.dumps(body, indent=1))
    return path


def fast_reports(monkeypatch) -> None:
    """drift's report.html and the sweep report (matplotlib, seconds each) replaced by stubs: the numbers are the
    subject here; summary.json and sweep.json are still written."""
    import driftscope.report
    import driftscope.sweep_run.report

    monkeypatch.setattr(driftscope.report, "write_report", lambda out, summary: Path(out) / "report.html")
    monkeypatch.setattr(driftscope.sweep_run.report, "write_report", lambda result, out: {})


def differences(a, b) -> list[tuple[str, object, object]]:
    """Leaves where two JSON values differ (a missing leaf counts)."""
    la, lb = dict(leaves(a)), dict(leaves(b))
    return [(k, la.get(k), lb.get(k)) for k in sorted(la.keys() | lb.keys()) if la.get(k) != lb.get(k)]


def drift_tasks(base: Path, ckpt: Path, data: list[Path], **opts) -> dict:
    """The per-task blocks of a separate drift run of one checkpoint, as JSON (what summary.json holds)."""
    from driftscope import drift

    report = drift(base, ckpt, data, out=None, **{"max_batch_tokens": 64, "progress": False, **opts})
    (model,) = report.summary["models"].values()
    return json.loads(json.dumps(model["tasks"]))
