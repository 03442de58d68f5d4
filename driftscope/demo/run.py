"""Build a tiny base checkpoint, a tuned variant changed only from layer `changed_from` on, and compare them.

Everything is generated here (tokenizer trained on the built-in corpus, random weights with a fixed
seed), so the demo needs no downloads. Writes `summary.json` to the output folder and returns it.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from driftscope.demo.corpus import MATH, TEXTS
from driftscope.engine.synth import random_checkpoint, write_checkpoint, write_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_pair(root: Path, *, seed: int = 0, changed_from: int = 2, noise: float = 0.5) -> tuple[Path, Path]:
    """Write `root/base` and `root/tuned`; tuned = base with layers >= changed_from perturbed."""
    base, tuned = root / "base", root / "tuned"
    write_tokenizer(base, TEXTS, vocab_size=400)
    from driftscope.engine.tokenizer import load_tokenizer

    n_vocab = load_tokenizer(base).vocab_size
    cfg = random_checkpoint(
        base, arch="qwen3", vocab_size=n_vocab, hidden_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=32, intermediate_size=256, tie=False, seed=seed,
    )
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for name, w in state.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and int(layer) >= changed_from and w.dim() == 2:
            state[name] = w + noise * w.std() * torch.randn(w.shape, generator=g, dtype=w.dtype)
    write_checkpoint(tuned, cfg, state)
    for f in TOKENIZER_FILES:
        if (base / f).exists():
            shutil.copy(base / f, tuned / f)
    return base, tuned


def _pack(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [tok.encode(t) for t in texts]
    ids = torch.tensor([i for s in seqs for i in s], dtype=torch.long)
    lens = torch.tensor([0] + [len(s) for s in seqs])
    return ids, torch.cumsum(lens, 0).to(torch.int32)


def run_demo(out: str | Path = "demo-out", *, seed: int = 0, changed_from: int = 2) -> dict:
    from driftscope import load_model, load_tokenizer, vocab_probe

    t0 = time.perf_counter()
    out = Path(out)
    base_dir, tuned_dir = build_pair(out / "checkpoints", seed=seed, changed_from=changed_from)
    tok = load_tokenizer(base_dir)
    base, tuned = load_model(base_dir), load_model(tuned_dir)
    ids, cu = _pack(tok, TEXTS)
    fb = base(ids, cu, output_hidden_states=True)
    ft = tuned(ids, cu, output_hidden_states=True)

    layers = []
    for i, (hb, ht) in enumerate(zip(fb.hidden_states, ft.hidden_states)):
        cos = torch.nn.functional.cosine_similarity(hb.double(), ht.double(), dim=-1).mean().item()
        rel = ((ht.double() - hb.double()).norm(dim=-1) / hb.double().norm(dim=-1)).mean().item()
        layers.append({"layer": i, "cosine": cos, "rel_l2": rel})

    # Score every position that has a next token inside its own sequence.
    pos = torch.cat([torch.arange(int(a), int(b) - 1) for a, b in zip(cu[:-1], cu[1:])])
    r = vocab_probe(fb.hidden[pos], base.lm_head_weight, ft.hidden[pos], tuned.lm_head_weight, targets=ids[pos + 1])
    per_text = []
    start = 0
    for text, a, b in zip(TEXTS, cu[:-1].tolist(), cu[1:].tolist()):
        n = b - a - 1
        sl = slice(start, start + n)
        start += n
        per_text.append({
            "text": text, "domain": "math" if text in MATH else "general", "tokens": n,
            "nll_base": -r.logp_base[sl].mean().item(), "nll_tuned": -r.logp_tuned[sl].mean().item(),
            "kl_tb": r.kl_tb[sl].mean().item(), "kl_bt": r.kl_bt[sl].mean().item(),
            "rank_shift": (r.rank_base[sl] - r.rank_tuned[sl]).double().mean().item(),
        })
    summary = {
        "base": str(base_dir), "tuned": str(tuned_dir), "changed_from_layer": changed_from,
        "tokens_scored": int(pos.numel()),
        "kl_tb_mean": r.kl_tb.double().mean().item(), "kl_bt_mean": r.kl_bt.double().mean().item(),
        "top1_agreement": (r.top_base == r.top_tuned).double().mean().item(),
        "layers": layers, "texts": per_text, "seconds": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(s: dict) -> str:
    lines = [f"driftscope demo: base vs tuned (tuned differs from layer {s['changed_from_layer']} on)",
             f"  tokens scored {s['tokens_scored']}, exact KL(tuned||base) {s['kl_tb_mean']:.4f} nats, "
             f"KL(base||tuned) {s['kl_bt_mean']:.4f}, top-1 agreement {s['top1_agreement']:.1%}",
             "  hidden-state drift per layer (0 = embeddings, last = after final norm):"]
    for row in s["layers"]:
        lines.append(f"    layer {row['layer']:2d}  cosine {row['cosine']:.4f}  rel-L2 {row['rel_l2']:.4f}")
    lines.append(f"  done in {s['seconds']:.1f} s")
    return "\n".join(lines)
