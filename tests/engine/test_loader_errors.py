"""load_model refuses what it cannot load faithfully, with an InputError naming the tensor, file or value: NaN/Inf
weights (stored, or made by the cast to the load dtype), unknown devices, pickle checkpoints without the flag."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from driftscope.engine.loader import load_model
from driftscope.testing import random_checkpoint, write_checkpoint
from driftscope.errors import InputError

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=48)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "m"
    random_checkpoint(root, shards=3, **TINY)
    return root


def _with_value(src, dst, name: str, index: tuple[int, ...], value: float):
    """A copy of checkpoint `src` in dst (one file) with tensor `name`[index] = value."""
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    state[name] = state[name].clone()
    state[name][index] = value
    write_checkpoint(dst, json.loads((src / "config.json").read_text()), state, shards=3)
    return dst


@pytest.mark.parametrize(("name", "index", "value"), [
    ("model.embed_tokens.weight", (96, 31), float("nan")),  # the last element
    ("model.layers.1.self_attn.k_proj.weight", (7, 3), float("inf")),  # a fused part (wqkv rows)
    ("model.layers.0.input_layernorm.weight", (0,), -float("inf")),  # a 1-D tensor, first element
], ids=["nan-embed-last", "inf-fused-k", "neginf-norm-first"])
def test_non_finite_weights_are_refused_naming_tensor_and_file(sharded, tmp_path, name, index, value):
    bad = _with_value(sharded, tmp_path / "bad", name, index, value)
    shard = next(f for f in bad.glob("model-*.safetensors") if name in load_file(str(f)))
    with pytest.raises(InputError) as exc:
        load_model(bad)
    msg = str(exc.value)
    assert "\n" not in msg and f"{shard}: tensor {name!r} holds 1 non-finite values (NaN/Inf)" in msg, msg


def test_a_cast_that_overflows_is_refused_naming_the_dtype(sharded, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    big = _with_value(sharded, tmp_path / "big", name, (5, 5), 1e6)  # finite in float32, beyond float16's 65504
    assert torch.isfinite(load_model(big).layers[0].mlp.w_down.weight).all()  # float32 and bfloat16 hold it
    load_model(big, dtype="bfloat16")
    with pytest.raises(InputError, match=rf"tensor '{name}' has 1 values beyond the range of torch.float16 "
                                         r"\(stored as torch.float32\); load it in bfloat16 or float32"):
        load_model(big, dtype="float16")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "meta", "mps"], ids=lambda d: f"device-{d}")
def test_an_unknown_device_is_refused_naming_it_and_the_accepted_forms(sharded, device):
    with pytest.raises(InputError) as exc:
        load_model(sharded, device=device)
    msg = str(exc.value)
    assert f"device={device!r}" in msg and "cpu, cuda, cuda:N" in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused(sharded, device):
    with pytest.raises(InputError, match=rf"device='{device}': CUDA is not available here .*use cpu"):
        load_model(sharded, device=device)


def test_the_pickle_refusal_names_the_flag_and_the_argument(sharded, tmp_path):
    state = {}
    for f in sorted(sharded.glob("*.safetensors")):
        state.update(load_file(str(f)))
    (tmp_path / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError) as exc:
        load_model(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "pytorch_model.bin") in msg and "--allow-pickle" in msg and "allow_pickle=True" in msg
    assert load_model(tmp_path, allow_pickle=True).config.num_layers == 2
