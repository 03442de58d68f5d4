"""Layer streaming (load_model(stream_layers=True)): bitwise the in-memory model's forward on the CPU, over every
layer order the runner and pad_states use; only two layers resident; damaged and pickle checkpoints refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from driftscope.engine.loader import load_model
from driftscope.engine.runner import LockstepRunner, pad_states
from driftscope.engine.streaming import StreamedLayers
from driftscope.testing import random_checkpoint, write_checkpoint
from driftscope.errors import InputError

TINY = dict(vocab_size=101, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48)
# (arch, layers, shards, tied, windowed): odd and even layer counts (the slots' wrap-around to the next batch's
# layer 0), sharded files (a layer's tensors in several files), qkv bias, a tied head, per-layer sliding windows
CASES = [("qwen3", 3, 1, False, False), ("qwen2", 4, 3, True, True), ("llama", 1, 1, False, False)]
IDS = [f"{a}-L{n}-shards{s}{'-tied' if t else ''}{'-window' if w else ''}" for a, n, s, t, w in CASES]


def _checkpoint(root, arch, layers, shards, tied, windowed, seed=0):
    cfg = random_checkpoint(root, arch, seed=seed, shards=shards, num_layers=layers, tie=tied, **TINY)
    if windowed:  # layers >= max_window_layers attend within 4 positions
        cfg.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
        (root / "config.json").write_text(json.dumps(cfg))
    return root


def _batch():
    ids = torch.tensor([5, 17, 3, 99, 42, 7, 7, 1, 64, 80, 11, 2, 30], dtype=torch.int64)
    return ids, torch.tensor([0, 9, 13], dtype=torch.int32)


@pytest.mark.parametrize(("arch", "layers", "shards", "tied", "windowed"), CASES, ids=IDS)
def test_streamed_forward_is_bitwise_the_in_memory_one(tmp_path, arch, layers, shards, tied, windowed):
    root = _checkpoint(tmp_path / "m", arch, layers, shards, tied, windowed)
    ref, streamed = load_model(root), load_model(root, stream_layers=True)
    assert isinstance(streamed.layers, StreamedLayers) and len(streamed.layers) == layers
    ids, cu = _batch()
    want = ref.forward(ids, cu, output_hidden_states=True).hidden_states
    for _ in range(2):  # the second forward starts from the layer prefetched after the first one's last layer
        got = streamed.forward(ids, cu, output_hidden_states=True).hidden_states
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if not torch.equal(a, b)]
        assert not bad, f"hidden states differ at {bad}: max |diff| {max((want[i] - got[i]).abs().max() for i in bad)}"
    block = streamed.layers[layers - 1]  # out of order: copied on the spot, not prefetched
    assert torch.equal(block.mlp.w_down.weight, ref.layers[layers - 1].mlp.w_down.weight)
    assert block.attn.window == ref.layers[layers - 1].attn.window
    assert all(torch.equal(a, b) for a, b in zip(pad_states(ref, 0), pad_states(streamed, 0)))
    assert torch.equal(streamed.lm_head_weight, ref.lm_head_weight)


def test_lockstep_with_a_streamed_and_a_resident_model(tmp_path):
    base = _checkpoint(tmp_path / "b", "qwen3", 3, 1, False, False)
    tuned = _checkpoint(tmp_path / "t", "qwen3", 3, 2, False, False, seed=1)
    ids, cu = _batch()
    seen: dict[str, list] = {"ref": [], "mixed": []}
    for key, models in (("ref", (load_model(base), load_model(tuned))),
                        ("mixed", (load_model(base, stream_layers=True), load_model(tuned)))):
        out = LockstepRunner(models[0], [models[1]]).forward(
            ids, cu, lambda i, hb, hts, k=key: seen[k].append((hb.clone(), hts[0].clone())))
        seen[key].append(out[:1] + tuple(out[1]))
    assert len(seen["ref"]) == len(seen["mixed"]) == 5
    for i, (a, b) in enumerate(zip(seen["ref"], seen["mixed"])):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"state {i} differs"


def test_only_two_layers_are_resident(tmp_path):
    root = _checkpoint(tmp_path / "m", "qwen3", 6, 1, False, False)
    ref, streamed = load_model(root), load_model(root, stream_layers=True)

    def nbytes(m, prefix):
        return sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n.startswith(prefix))

    per_layer = nbytes(ref, "layers.0.")
    assert nbytes(streamed, "layers.") == 2 * per_layer, "two slots of one layer each"
    assert nbytes(ref, "layers.") == 6 * per_layer
    glob = sum(nbytes(ref, p) for p in ("tok_embeddings.", "norm.", "output."))
    assert sum(p.numel() * p.element_size() for p in streamed.parameters()) == glob + 2 * per_layer


def test_a_non_finite_layer_weight_is_refused_at_load(tmp_path):
    src = _checkpoint(tmp_path / "m", "qwen3", 2, 1, False, False)
    state = {k: v.clone() for k, v in load_file(str(src / "model.safetensors")).items()}
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    root = write_checkpoint(tmp_path / "bad", json.loads((src / "config.json").read_text()), state)
    with pytest.raises(InputError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' holds 1 "
                                         "non-finite"):
        load_model(root, stream_layers=True)


def test_pickle_checkpoints_cannot_stream(tmp_path):
    root = _checkpoint(tmp_path / "m", "qwen3", 1, 1, False, False)
    torch.save(load_file(str(root / "model.safetensors")), root / "pytorch_model.bin")
    (root / "model.safetensors").unlink()
    with pytest.raises(InputError, match="pytorch_model.bin: stream_layers=True .* convert this pickle checkpoint"):
        load_model(root, allow_pickle=True, stream_layers=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_cuda_forward_is_bitwise_the_resident_one(tmp_path, dtype):
    """The CUDA pipeline (pinned staging, side-stream uploads, events): same kernels on the same weights."""
    root = _checkpoint(tmp_path / "m", "qwen2", 4, 3, True, True)
    ref = load_model(root, "cuda", dtype)
    streamed = load_model(root, "cuda", dtype, stream_layers=True)
    ids, cu = (x.cuda() for x in _batch())
    want = ref.forward(ids, cu, output_hidden_states=True).hidden_states
    for _ in range(3):
        got = streamed.forward(ids, cu, output_hidden_states=True).hidden_states
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    cpu_tuned = load_model(root)  # a model per device: the tuned states come to the base's device
    hb, (ht,) = LockstepRunner(ref, [cpu_tuned]).forward(ids.cpu(), cu.cpu())
    assert hb.device.type == ht.device.type == "cuda"
