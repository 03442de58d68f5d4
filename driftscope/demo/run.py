"""`driftscope demo`: build a tiny base checkpoint and a tuned variant changed only from layer `changed_from` on,
then run the full drift analysis on two generated datasets (math, general) and write the report.

Everything is generated here (tokenizer trained on the generated corpus, random weights with a fixed seed),
so the demo needs no downloads.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from driftscope.demo.corpus import corpus_texts, general_records, math_records
from driftscope.testing import random_checkpoint, write_checkpoint, write_tokenizer
from driftscope.util import write_jsonl

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_pair(root: Path, *, seed: int = 0, changed_from: int = 2, noise: float = 0.5) -> tuple[Path, Path]:
    """Write `root/base` and `root/tuned`; tuned = base with the matrices of layers >= changed_from perturbed."""
    from driftscope.engine.tokenizer import load_tokenizer

    base, tuned = root / "base", root / "tuned"
    write_tokenizer(base, corpus_texts(seed), vocab_size=400)
    cfg = random_checkpoint(
        base, arch="qwen3", vocab_size=load_tokenizer(base).vocab_size, hidden_size=128, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256, tie=False, seed=seed,
    )
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for name, w in state.items():
        parts = name.split(".")
        if name.startswith("model.layers.") and int(parts[2]) >= changed_from and w.dim() == 2:
            state[name] = w + noise * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype)
    write_checkpoint(tuned, cfg, state)
    for f in TOKENIZER_FILES:
        if (base / f).exists():
            shutil.copy(base / f, tuned / f)
    return base, tuned


def write_datasets(root: Path, seed: int = 0) -> list[Path]:
    """root/math.jsonl and root/general.jsonl (ASCII JSON lines of {"prompt", "response"})."""
    return [write_jsonl(root / "math.jsonl", math_records(seed=seed), ensure_ascii=True),
            write_jsonl(root / "general.jsonl", general_records(seed=seed + 1), ensure_ascii=True)]


def run_demo(out: str | Path = "demo-out", *, seed: int = 0, changed_from: int = 2, progress: bool = False):
    """Returns the DriftReport of the demo run (its files are in `out`)."""
    from driftscope.drift_run.run import drift

    out = Path(out)
    base, tuned = build_pair(out / "checkpoints", seed=seed, changed_from=changed_from)
    data = write_datasets(out / "data", seed=seed)
    return drift(base, tuned, data, out, pca="streaming", max_batch_tokens=512, progress=progress)


def format_summary(report, changed_from: int = 2) -> str:
    s = report.summary
    lines = [f"driftscope demo: base vs tuned (the tuned model differs from layer {changed_from} on)"]
    for model, m in s["models"].items():
        for task, t in m["tasks"].items():
            lines.append(
                f"  {task:8s} {t['tokens']:5d} tokens  KL(tuned||base) {t['kl_tb']['token_mean']:.4f}  "
                f"KL(base||tuned) {t['kl_bt']['token_mean']:.4f}  rank shift {t['rank_shift']['token_mean']:+.2f}  "
                f"top-1 agreement {t['top1_agreement']:.1%}"
            )
        first = next(iter(m["tasks"].values()))
        lines.append("  hidden-state drift per layer (state 0 = embeddings, last = after the final norm):")
        for row in first["layers"]:
            lines.append(f"    state {row['layer']:2d}  cosine {row['cosine']:.4f}  rel-L2 {row['rel_l2']:.4f}  "
                         f"PCA shift {row['pca_shift']:+.4f}")
    lines.append(f"  {s['timing']['tokens']} tokens in {s['timing']['seconds']:.1f} s")
    return "\n".join(lines)
