"""ModelConfig: both HF config styles, per-architecture flags, validation errors that name the field and file."""
from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import CASE_IDS, CASES, hf_config, rewrite_style

from driftscope.engine.config import ModelConfig
from driftscope.engine.model import Transformer, rope_inv_freq
from driftscope.testing import hf_config as synth_config


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_both_styles_give_the_same_config(case, tmp_path):
    new = tmp_path / "config.json"
    new.write_text(json.dumps({**hf_config(case).to_dict(), "dtype": "bfloat16"}))
    a = ModelConfig.from_file(new)
    rewrite_style(new, "rope_theta+torch_dtype")
    raw = json.loads(new.read_text())
    assert "rope_parameters" not in raw and "torch_dtype" in raw and "dtype" not in raw
    b = ModelConfig.from_file(tmp_path)  # the folder works too
    assert a == b and a.torch_dtype == "bfloat16"
    assert a.head_dim == case.kwargs.get("head_dim", 64 // case.kwargs["num_attention_heads"])
    assert a.n_kv_groups == a.num_heads // a.num_kv_heads


def test_flags_per_architecture():
    def cfg(arch, **kw):
        d = synth_config(arch, vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                         intermediate_size=8)
        d.update(kw)
        return ModelConfig.from_dict(d, source=f"test-{arch}")

    assert cfg("qwen2").qkv_bias and not cfg("qwen2").o_bias
    q3 = cfg("qwen3", head_dim=12)
    assert q3.qk_norm and q3.head_dim == 12 and q3.q_size == 48 and q3.kv_size == 24
    assert not cfg("qwen3").qkv_bias and cfg("qwen3", attention_bias=True).o_bias
    ll = cfg("llama", attention_bias=True, mlp_bias=True)
    assert ll.qkv_bias and ll.o_bias and ll.mlp_bias and not ll.qk_norm
    assert not cfg("mistral", attention_bias=True).qkv_bias  # Mistral has no biases whatever the config says
    assert cfg("llama", tie_word_embeddings=True).tie_word_embeddings


def test_qwen3_without_head_dim_follows_transformers_default():
    d = synth_config("qwen3", vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=8)
    del d["head_dim"]
    assert ModelConfig.from_dict(d).head_dim == 128  # Qwen3Config's default, not hidden // heads


def test_llama3_rope_params_and_frequencies():
    case = CASES[2]
    c = ModelConfig.from_dict(hf_config(case).to_dict())
    assert c.rope_type == "llama3"
    assert c.rope_scaling == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32.0}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config(case), "cpu")
    ours = rope_inv_freq(c)
    assert torch.equal(ours, ref), (ours, ref)
    plain = rope_inv_freq(ModelConfig.from_dict({**hf_config(CASES[0]).to_dict()}))
    assert not torch.equal(ours, plain)  # the scaling really changes some frequencies


def test_llama3_old_style_rope_scaling():
    d = hf_config(CASES[2]).to_dict()
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}  # the oldest spelling: "type"
    assert ModelConfig.from_dict(d).rope_type == "llama3"


ERRORS = [
    ("kv-not-dividing", dict(num_key_value_heads=3), "num_key_value_heads"),
    ("hidden-not-divisible", dict(hidden_size=30, head_dim=None), "hidden_size"),
    ("odd-head-dim", dict(head_dim=7), "head_dim"),
    ("zero-layers", dict(num_hidden_layers=0), "num_layers"),
    ("unknown-model-type", dict(model_type="gemma", architectures=["GemmaForCausalLM"]), "model_type='gemma'"),
    ("unknown-architecture", dict(model_type=None, architectures=["FalconForCausalLM"]), "FalconForCausalLM"),
    ("arch-type-mismatch", dict(architectures=["Qwen2ForCausalLM"]), "disagrees"),
    ("unknown-rope", dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1e4}), "'proportional'"),
    ("llama3-incomplete", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 2.0}),
     "low_freq_factor"),
    ("bad-dtype", dict(dtype="float64"), "float64"),
    ("gelu", dict(hidden_act="gelu"), "hidden_act"),
    ("missing-key", dict(vocab_size=None), "vocab_size"),
]


@pytest.mark.parametrize("edit,needle", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_invalid_configs_name_the_field_and_file(tmp_path, edit, needle):
    d = synth_config("llama", vocab_size=10, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=8)
    d["head_dim"] = 8
    for k, v in edit.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as exc:
        ModelConfig.from_file(tmp_path / "config.json")
    assert needle in str(exc.value) and "config.json" in str(exc.value), str(exc.value)


def test_unsupported_lists_what_is_supported():
    with pytest.raises(ValueError) as exc:
        ModelConfig.from_dict({"model_type": "phi3"}, source="x/config.json")
    for name in ("llama", "mistral", "qwen2", "qwen3", "x/config.json"):
        assert name in str(exc.value)


def test_sliding_window_ignored_when_disabled_applied_when_exceeded():
    """use_sliding_window=false -> no window. An active window (Mistral v0.1) applies per layer; a sequence longer
    than the window is prepared (its attention is banded: tests/engine/test_parity_arch.py checks the logits)."""
    d = synth_config("qwen2", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=8)
    d.update(use_sliding_window=False, sliding_window=4)
    assert ModelConfig.from_dict(d).sliding_window is None
    m = synth_config("mistral", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                     intermediate_size=8)
    m["sliding_window"] = 8
    c = ModelConfig.from_dict(m, source="mistral/config.json")
    assert c.sliding_window == 8
    model = Transformer(c)
    model.prepare(torch.arange(8), None)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    model.prepare(torch.arange(16), cu)  # two sequences of 8: fine
    assert c.layer_windows == (8,)
    model.prepare(torch.arange(9), None)
