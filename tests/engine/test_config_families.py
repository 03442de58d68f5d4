"""The model families of the paper's Table 5 (and Mistral v0.1's sliding window): their published config.json files
(tests/fixtures/configs) load with the expected shapes, and a shrunk copy of each (same structural fields, tiny
sizes) matches transformers' logits; per-layer window selection follows transformers' Qwen2/Qwen3 configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from arch_helpers import assert_packed_matches, build

from driftscope.engine.config import ModelConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
# name: arch, hidden, layers, heads, kv heads, head_dim, vocab, rope type, rope theta, tied, sliding window
FAMILIES = {
    "Qwen2.5-7B": ("qwen2", 3584, 28, 28, 4, 128, 152064, "default", 1e6, False, None),
    "Qwen2.5-7B-Instruct": ("qwen2", 3584, 28, 28, 4, 128, 152064, "default", 1e6, False, None),
    "Qwen2.5-Math-7B": ("qwen2", 3584, 28, 28, 4, 128, 152064, "default", 1e4, False, None),
    "Qwen2.5-14B": ("qwen2", 5120, 48, 40, 8, 128, 152064, "default", 1e6, False, None),
    "Qwen2.5-14B-Instruct": ("qwen2", 5120, 48, 40, 8, 128, 152064, "default", 1e6, False, None),
    "Qwen2.5-32B": ("qwen2", 5120, 64, 40, 8, 128, 152064, "default", 1e6, False, None),
    "Qwen2.5-32B-Instruct": ("qwen2", 5120, 64, 40, 8, 128, 152064, "default", 1e6, False, None),
    "Qwen3-4B": ("qwen3", 2560, 36, 32, 8, 128, 151936, "default", 1e6, True, None),
    "Qwen3-8B": ("qwen3", 4096, 36, 32, 8, 128, 151936, "default", 1e6, False, None),
    "Qwen3-14B": ("qwen3", 5120, 40, 40, 8, 128, 151936, "default", 1e6, False, None),
    "Llama-3.1-8B": ("llama", 4096, 32, 32, 8, 128, 128256, "llama3", 5e5, False, None),
    "Mistral-Small-24B-Base-2501": ("mistral", 5120, 40, 32, 8, 128, 131072, "default", 1e8, False, None),
    "Mistral-7B-v0.1": ("mistral", 4096, 32, 32, 8, 128, 32000, "default", 1e4, False, 4096),
}
NAMES = list(FAMILIES)


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_published_config_loads_with_expected_shapes(name):
    c = ModelConfig.from_file(FIXTURES / f"{name}.json")
    arch, hidden, layers, heads, kv, head_dim, vocab, rope, theta, tied, window = FAMILIES[name]
    got = (c.arch, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size,
           c.rope_type, c.rope_theta, c.tie_word_embeddings, c.sliding_window)
    assert got == (arch, hidden, layers, heads, kv, head_dim, vocab, rope, theta, tied, window), got
    assert c.layer_windows == (window,) * layers and c.rotary_dim == head_dim and c.torch_dtype == "bfloat16"
    assert c.qkv_bias == (arch == "qwen2") and c.qk_norm == (arch == "qwen3")
    if rope == "llama3":
        assert c.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192.0}


def test_readme_yarn_override_of_qwen3():
    """Qwen3/Qwen2.5 model cards extend the context by adding yarn rope_scaling to config.json."""
    d = {**_fixture("Qwen3-8B"), "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768}}
    c = ModelConfig.from_dict(d)
    assert c.rope_type == "yarn" and c.rope_scaling["factor"] == 4.0


def shrink(d: dict) -> tuple[str, dict]:
    """(model_type, transformers config kwargs): the structural fields of `d` at hidden 64, 2 layers, 4 heads (GQA
    kept, an explicit head_dim that differs from hidden / heads kept differing), contexts scaled to 16 / 64."""
    small = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "transformers_version",
                                                     "torch_dtype", "bos_token_id", "eos_token_id")}
    ratio = min(d["num_attention_heads"] // d["num_key_value_heads"], 4)
    small.update(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4 // ratio, max_position_embeddings=64)
    if "head_dim" in d:
        small["head_dim"] = 16 if d["head_dim"] * d["num_attention_heads"] == d["hidden_size"] else 24
    if d.get("sliding_window") is not None:
        small["sliding_window"] = 5
    if d.get("max_window_layers") is not None:
        small["max_window_layers"] = min(d["max_window_layers"], 1)
    if d.get("rope_scaling"):
        small["rope_scaling"] = {**d["rope_scaling"], "original_max_position_embeddings": 16}
    return d["model_type"], small


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_copy_matches_transformers(tmp_path, name):
    model_type, small = shrink(_fixture(name))
    hf, model = build(tmp_path, model_type, small)
    c, ref = model.config, ModelConfig.from_file(FIXTURES / f"{name}.json")
    assert (c.arch, c.rope_type, c.tie_word_embeddings, c.qkv_bias, c.qk_norm) == (
        ref.arch, ref.rope_type, ref.tie_word_embeddings, ref.qkv_bias, ref.qk_norm)
    assert (c.sliding_window is None) == (ref.sliding_window is None)
    assert_packed_matches(hf, model, [23, 6, 17, 1], name)


WINDOW_FIELDS = [  # Qwen2/Qwen3 config.json window fields -> which layers slide
    dict(use_sliding_window=False, sliding_window=4, max_window_layers=1),
    dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
    dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),
    dict(use_sliding_window=True, sliding_window=4),  # max_window_layers absent: 28
    dict(use_sliding_window=True, sliding_window=None, max_window_layers=0),
    dict(sliding_window=4, max_window_layers=0),  # use_sliding_window absent: False
    dict(use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention"]),
]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("fields", WINDOW_FIELDS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items())[:60])
def test_window_layers_follow_transformers(model_type, fields):
    from transformers import AutoConfig

    d = dict(model_type=model_type, vocab_size=10, hidden_size=32, intermediate_size=8, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, **fields)
    hf = AutoConfig.for_model(**d)
    want = tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    assert ModelConfig.from_dict(d).layer_windows == want
    assert ModelConfig.from_dict(hf.to_dict()).layer_windows == want  # as transformers saves it (layer_types)


def test_mistral_window_defaults_like_transformers():
    from transformers import AutoConfig

    d = dict(model_type="mistral", vocab_size=10, hidden_size=32, intermediate_size=8, num_hidden_layers=2,
             num_attention_heads=4)
    assert ModelConfig.from_dict(d).layer_windows == (AutoConfig.for_model(**d).sliding_window,) * 2 == (4096, 4096)
    llama = ModelConfig.from_dict({**d, "model_type": "llama", "sliding_window": 8})
    assert llama.layer_windows == (None, None)  # Llama has no sliding window, whatever the config says
