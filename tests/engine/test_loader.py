"""Loader: each checkpoint defect fails with a one-line error naming the file and tensor; safe paths load exactly."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from engine_helpers import CASES, assert_close
from safetensors.torch import load_file, save_file

from driftscope.engine.loader import expected_weights, load_model
from driftscope.testing import random_checkpoint

SMALL = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    random_checkpoint(tmp_path / "m", "qwen3", **SMALL, head_dim=24)
    return tmp_path / "m"


@pytest.fixture
def sharded(tmp_path) -> Path:
    random_checkpoint(tmp_path / "s", "llama", **SMALL, shards=3)
    return tmp_path / "s"


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_single_and_sharded_load_the_same_weights(tmp_path):
    a = random_checkpoint(tmp_path / "a", "llama", **SMALL, seed=3)
    random_checkpoint(tmp_path / "b", "llama", **SMALL, seed=3, shards=4)
    assert json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())["weight_map"]
    ma, mb = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a["num_hidden_layers"] == len(ma.layers)
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_fused_weights_are_the_hf_tensors(ckpt):
    m = load_model(ckpt)
    hf = load_file(str(ckpt / "model.safetensors"))
    c = m.config
    wqkv = m.layers[1].attn.wqkv.weight  # [q | k | v, d]
    assert torch.equal(wqkv[: c.q_size], hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(wqkv[c.q_size : c.q_size + c.kv_size], hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(wqkv[c.q_size + c.kv_size :], hf["model.layers.1.self_attn.v_proj.weight"])
    gu = m.layers[0].mlp.w_gate_up.weight  # [gate | up, d]
    assert torch.equal(gu[: c.intermediate_size], hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(gu[c.intermediate_size :], hf["model.layers.0.mlp.up_proj.weight"])


def test_weight_table_covers_every_parameter_of_every_case():
    from driftscope.engine.config import ModelConfig
    from engine_helpers import hf_config

    for case in CASES:
        d = hf_config(case).to_dict()
        expected = expected_weights(ModelConfig.from_dict(d, source=case.id))
        assert ("lm_head.weight" in expected) == (not case.kwargs.get("tie_word_embeddings", False)), case.id


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_stored_dtype_is_cast_to_requested(tmp_path, dtype):
    random_checkpoint(tmp_path / "m", "qwen2", **SMALL, dtype="bfloat16")
    m = load_model(tmp_path / "m", dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {getattr(torch, dtype)}
    ref = load_model(tmp_path / "m", dtype="float32")
    assert torch.equal(m.layers[0].attn.wqkv.weight, ref.layers[0].attn.wqkv.weight.to(getattr(torch, dtype)))


def test_missing_shard_file(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(sharded / shard)
    with pytest.raises(FileNotFoundError) as exc:
        load_model(sharded)
    assert shard in _one_line(exc) and "missing" in str(exc.value)


def test_tensor_listed_in_index_but_not_in_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    _rewrite(sharded / shard, lambda t: t.pop(name))
    with pytest.raises(ValueError) as exc:
        load_model(sharded)
    assert name in _one_line(exc) and "model.safetensors.index.json" in str(exc.value)


@pytest.mark.parametrize("keep_bytes", [100, -100], ids=["header-cut", "data-cut"])
def test_truncated_safetensors(ckpt, keep_bytes):
    f = ckpt / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(keep_bytes if keep_bytes > 0 else size + keep_bytes)
    with pytest.raises(ValueError) as exc:
        load_model(ckpt)
    assert str(f) in _one_line(exc) and "truncated" in str(exc.value)


def test_wrong_shape(ckpt):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(ckpt / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(47, 64)))
    with pytest.raises(ValueError) as exc:
        load_model(ckpt)
    msg = _one_line(exc)
    assert name in msg and "model.safetensors" in msg and "[47, 64]" in msg and "[48, 64]" in msg


def test_missing_tensor(ckpt):
    name = "model.layers.0.self_attn.q_norm.weight"
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(ValueError) as exc:
        load_model(ckpt)
    assert name in _one_line(exc) and "model.safetensors" in str(exc.value)


def test_missing_untied_head(ckpt):
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    name = "model.layers.0.self_attn.q_proj.bias"  # qwen3 without attention_bias has none
    _rewrite(ckpt / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(96)))
    with pytest.raises(ValueError) as exc:
        load_model(ckpt)
    assert name in _one_line(exc) and "unexpected" in str(exc.value) and "model.safetensors" in str(exc.value)


def test_tied_checkpoint_that_also_stores_the_head_loads(tmp_path):
    random_checkpoint(tmp_path / "m", "qwen2", **SMALL, tie=True)
    f = tmp_path / "m" / "model.safetensors"
    _rewrite(f, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    m = load_model(tmp_path / "m")
    assert m.output is None and m.lm_head_weight is m.tok_embeddings.weight


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as exc:
        load_model(ckpt)
    msg = _one_line(exc)
    assert "config.json" in msg and "gpt2" in msg and "qwen3" in msg and "llama" in msg


def test_unknown_rope_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 4.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as exc:
        load_model(ckpt)
    msg = _one_line(exc)
    assert "config.json" in msg and "proportional" in msg and "yarn" in msg and "llama3" in msg


def test_no_weights_at_all(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(ckpt)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")


def test_bad_dtype_argument(ckpt):
    with pytest.raises(ValueError, match="float64"):
        load_model(ckpt, dtype="float64")


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_refused_unless_allowed(ckpt, fname):
    ref = load_model(ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    torch.save(sd, ckpt / fname)
    with pytest.raises(ValueError) as exc:
        load_model(ckpt)
    msg = _one_line(exc)
    assert fname in msg and "--allow-pickle" in msg and "allow_pickle=True" in msg and "execute code" in msg
    m = load_model(ckpt, allow_pickle=True)
    ids = torch.arange(11)
    assert_close(m.logits(ids), ref.logits(ids), 0.0, "pickle vs safetensors")


def test_auto_map_code_is_never_executed(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    (ckpt / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    load_model(ckpt)
    assert not marker.exists()


def test_transformers_sharded_checkpoint_with_a_missing_shard(checkpoints, tmp_path):
    """A transformers-written sharded checkpoint (save_pretrained, many shards) with one shard removed."""
    src = checkpoints.path(CASES[6])
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    assert (dst / "model.safetensors.index.json").is_file()
    load_model(dst)
    victim = sorted(dst.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError) as exc:
        load_model(dst)
    assert victim.name in _one_line(exc)


def test_loading_does_not_import_dynamo(tmp_path):
    """Building the model skeleton on the meta device skips nn.Embedding's normal_ init, which there imports
    torch._dynamo (1.0-1.4 s of every command's start), and materializing it skips to_empty's meta empty_like (it
    imports torch's symbolic shapes, 0.46 s); the loaded weights are the stored ones either way."""
    import subprocess
    import sys

    from driftscope.testing import random_checkpoint

    random_checkpoint(tmp_path / "ckpt", "llama", **SMALL, seed=1)
    code = ("import sys, torch; from driftscope.engine.loader import load_model; "
            f"m = load_model({str(tmp_path / 'ckpt')!r}); "
            "from safetensors.torch import load_file; "
            f"w = load_file({str(tmp_path / 'ckpt' / 'model.safetensors')!r})['model.embed_tokens.weight']; "
            "assert torch.equal(m.tok_embeddings.weight, w); "
            "print(any(x in sys.modules for x in ('torch._dynamo', 'torch.fx.experimental.symbolic_shapes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
