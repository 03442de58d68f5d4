"""Shared tables and helpers for the engine tests: tiny random transformers checkpoints, verbose closeness checks."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Shared table of tiny model cases: id -> transformers config kwargs. hidden 64, 2 layers, vocab ~300.
BASE = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6)


@dataclass(frozen=True)
class Case:
    id: str
    model_type: str
    kwargs: dict = field(default_factory=dict)
    shard: bool = False  # save with a tiny max_shard_size -> model.safetensors.index.json


CASES = [
    Case("llama-mha-untied", "llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    Case("llama-gqa-tied-bias", "llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                                attention_bias=True, mlp_bias=True)),
    Case("llama3rope-gqa", "llama", dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 32})),
    Case("mistral-gqa", "mistral", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None)),
    Case("qwen2-qkvbias-tied", "qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    Case("qwen3-headdim24-gqa", "qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    Case("qwen3-tied-mha-sharded", "qwen3", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                                  tie_word_embeddings=True), shard=True),
]
CASE_IDS = [c.id for c in CASES]
STYLES = ["rope_parameters+dtype", "rope_theta+torch_dtype"]


def hf_config(case: Case):
    from transformers import AutoConfig

    return AutoConfig.for_model(case.model_type, **BASE, **case.kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: norms ~ 1 + N(0, 0.1), q/k ~ N(0, 0.15) (peaky attention, so rope and masking errors
    show), embeddings ~ N(0, 1), everything else (incl. biases) ~ N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(0.15 * noise)
            elif "embed_tokens" in name:
                p.copy_(1.0 * noise)
            else:
                p.copy_(0.05 * noise)


def rewrite_style(config_path: Path, style: str) -> None:
    """Hand-rewrite a transformers-5 config.json into the older rope_theta/rope_scaling + torch_dtype style."""
    if style == "rope_parameters+dtype":
        return
    assert style == "rope_theta+torch_dtype", style
    d = json.loads(config_path.read_text())
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    rope_type = rp.pop("rope_type")
    d["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rp}
    d["torch_dtype"] = d.pop("dtype")
    config_path.write_text(json.dumps(d, indent=2))


class Checkpoints:
    """Session cache: each (case, style, dtype) checkpoint is built once; the transformers model is kept in memory."""

    def __init__(self, root: Path):
        self.root = root
        self._hf: dict[str, torch.nn.Module] = {}
        self._dirs: dict[tuple[str, str, str], Path] = {}

    def hf_model(self, case: Case):
        if case.id not in self._hf:
            from transformers import AutoModelForCausalLM

            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(hf_config(case), dtype=torch.float32, attn_implementation="eager")
            randomize_(m)
            if case.kwargs.get("tie_word_embeddings"):
                assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
            self._hf[case.id] = m.eval()
        return self._hf[case.id]

    def path(self, case: Case, style: str = STYLES[0], dtype: str = "float32") -> Path:
        key = (case.id, style, dtype)
        if key not in self._dirs:
            d = self.root / f"{case.id}-{style}-{dtype}"
            base = self.root / f"{case.id}-base-{dtype}"
            if not base.exists():
                m = self.hf_model(case)
                if dtype != "float32":
                    m = copy.deepcopy(m).to(getattr(torch, dtype))
                m.save_pretrained(base, safe_serialization=True, max_shard_size="40KB" if case.shard else "5GB")
            shutil.copytree(base, d)
            rewrite_style(d / "config.json", style)
            self._dirs[key] = d
        return self._dirs[key]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol_of_max: float, what: str = "") -> float:
    """Check max|Δ| / max|expected| ≤ rtol_of_max; on failure print the max error, its index and both values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    scale = e.abs().max().item()
    err = diff.max().item() / max(scale, 1e-30)
    if not err <= rtol_of_max:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        bad = int((diff > rtol_of_max * scale).sum())
        raise AssertionError(
            f"{what}: max|Δ|/max|ref| = {err:.3e} > {rtol_of_max:.1e}; max|Δ| = {diff.max().item():.3e} at {idx} "
            f"(actual {a[idx].item():.6g}, expected {e[idx].item():.6g}); {bad}/{diff.numel()} elements over; "
            f"max|ref| = {scale:.4g}"
        )
    return err
