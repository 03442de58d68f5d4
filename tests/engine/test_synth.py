"""synth: random checkpoints that driftscope and transformers both load identically, in every style and layout."""
from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import assert_close
from safetensors import safe_open

from driftscope import load_model, load_tokenizer
from driftscope.testing import random_checkpoint, write_checkpoint, write_tokenizer

# id -> random_checkpoint kwargs (hidden 64, 2 layers, vocab 300 throughout)
SYNTH = {
    "llama-tied-rope_theta": dict(arch="llama", num_kv_heads=2, tie=True, config_style="rope_theta"),
    "mistral-mqa-2shards": dict(arch="mistral", num_kv_heads=1, shards=2),
    "qwen2-bf16": dict(arch="qwen2", num_kv_heads=2, dtype="bfloat16"),
    "qwen3-hd24-3shards-rope_theta": dict(arch="qwen3", num_kv_heads=2, head_dim=24, shards=3,
                                          config_style="rope_theta"),
}
COMMON = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)


@pytest.mark.parametrize("kw", list(SYNTH.values()), ids=list(SYNTH))
def test_random_checkpoint_matches_transformers(tmp_path, kw):
    from transformers import AutoModelForCausalLM

    cfg = random_checkpoint(tmp_path, **COMMON, **kw)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == kw["arch"] and cfg["model_type"] == kw["arch"]
    style_key = "rope_theta" if kw.get("config_style") == "rope_theta" else "rope_parameters"
    assert style_key in on_disk
    if kw.get("shards", 1) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == kw["shards"]
    ours = load_model(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    assert_close(ours.logits(ids), ref, 1e-4, "synthetic checkpoint vs transformers")


def test_random_checkpoint_is_deterministic(tmp_path):
    a = random_checkpoint(tmp_path / "a", "qwen3", **COMMON, num_kv_heads=2, seed=5)
    b = random_checkpoint(tmp_path / "b", "qwen3", **COMMON, num_kv_heads=2, seed=5)
    random_checkpoint(tmp_path / "c", "qwen3", **COMMON, num_kv_heads=2, seed=6)
    assert a == b
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_write_checkpoint_casts_and_validates(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    write_checkpoint(tmp_path / "x", {"model_type": "llama"}, sd, shards=2, dtype="float16")
    index = json.loads((tmp_path / "x" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == (12 + 5) * 2
    with safe_open(str(tmp_path / "x" / index["weight_map"]["a"]), "pt") as f:
        assert f.get_tensor("a").dtype == torch.float16
    assert json.loads((tmp_path / "x" / "config.json").read_text())["dtype"] == "float16"
    with pytest.raises(ValueError, match="shards=3"):
        write_checkpoint(tmp_path / "y", {}, sd, shards=3)
    with pytest.raises(ValueError, match="float64"):
        write_checkpoint(tmp_path / "z", {}, sd, dtype="float64")
    with pytest.raises(ValueError, match="gpt2"):
        random_checkpoint(tmp_path / "w", "gpt2", **COMMON, num_kv_heads=2)


def test_offline_demo_pair(tmp_path):
    """What `driftscope demo` needs: a tokenizer and a model sharing its vocabulary, all written offline."""
    tok = load_tokenizer(write_tokenizer(tmp_path, ["a small corpus for a small demo"] * 5, vocab_size=280))
    random_checkpoint(tmp_path, "qwen3", **{**COMMON, "vocab_size": tok.vocab_size}, num_kv_heads=2)
    model = load_model(tmp_path)
    ids = torch.tensor(tok.apply_chat_template([{"role": "user", "content": "a demo"}], tokenize=True))
    logits = model.logits(ids)
    assert logits.shape == (len(ids), tok.vocab_size) and torch.isfinite(logits).all()
