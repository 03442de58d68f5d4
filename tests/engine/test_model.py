"""Transformer API contract the lockstep runner builds on: prepare / embed / layers / final_norm / lm_head_weight;
head(), the one place logits are computed."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import assert_close

from driftscope.engine.loader import load_model
from driftscope.engine.model import ForwardOutput, LayerBatch
from driftscope.testing import random_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    random_checkpoint(path, "qwen3", vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=24, intermediate_size=96)
    return load_model(path)


def _batch():
    lengths = [5, 1, 8]
    ids = torch.randint(0, 300, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    return ids, cu


def test_manual_layer_loop_equals_forward_and_leaves_inputs_alone(model):
    ids, cu = _batch()
    batch = model.prepare(ids, cu)
    assert isinstance(batch, LayerBatch) and batch.max_seqlen == 8
    # positions restart per sequence
    cos, sin = model.rope_tables(torch.tensor([0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7]))
    assert torch.equal(batch.cos, cos) and torch.equal(batch.sin, sin)
    assert batch.cos.shape == (14, 1, 12) and batch.sin.shape == (14, 1, 12)
    h = model.embed(ids)  # [T, d]
    states = [h]
    for layer in model.layers:
        before = h.clone()
        h = layer(h, batch)
        assert torch.equal(states[-1], before), "a layer modified its input in place"
        states.append(h)
    final = model.final_norm(h)
    out = model.forward(ids, cu, output_hidden_states=True)
    assert isinstance(out, ForwardOutput)
    assert torch.equal(final, out.hidden)
    for i in range(len(model.layers)):  # [i] = output of layer i-1 (embedding for i = 0), as transformers
        assert torch.equal(states[i], out.hidden_states[i]), i
    assert torch.equal(out.hidden_states[-1], final)
    assert model.forward(ids, cu).hidden_states is None


def test_lm_head_weight_tied_and_untied(model, tmp_path):
    assert model.lm_head_weight is model.output.weight and model.lm_head_weight.shape == (300, 64)
    random_checkpoint(tmp_path, "llama", vocab_size=300, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                      intermediate_size=96, tie=True)
    tied = load_model(tmp_path)
    assert tied.output is None and tied.lm_head_weight is tied.tok_embeddings.weight
    ids, cu = _batch()
    for m in (model, tied):  # head(): the one place logits are computed, the same op as F.linear on the head
        hidden = m.forward(ids, cu).hidden
        want = torch.nn.functional.linear(hidden, m.lm_head_weight).float()
        assert torch.equal(m.head(hidden), want) and torch.equal(m.logits(ids), m.head(m.forward(ids).hidden))


def test_no_autograd_state(model):
    ids, cu = _batch()
    out = model.forward(ids, cu)
    assert not out.hidden.requires_grad and out.hidden.is_inference()
    assert not any(p.requires_grad for p in model.parameters())


def test_default_cu_seqlens_is_one_sequence(model):
    ids, _ = _batch()
    one = torch.tensor([0, len(ids)], dtype=torch.int32)
    assert_close(model.forward(ids).hidden, model.forward(ids, one).hidden, 0.0, "cu_seqlens=None")


BAD_PACKING = {
    "float-cu": (torch.tensor([0.0, 14.0]), "int32/int64"),  # int64 and lists are taken: test_model_inputs.py
    "short-total": (torch.tensor([0, 13], dtype=torch.int32), "end at T=14"),
    "decreasing": (torch.tensor([0, 9, 5, 14], dtype=torch.int32), "non-decreasing"),
    "not-from-zero": (torch.tensor([1, 14], dtype=torch.int32), "start at 0"),
}


@pytest.mark.parametrize("cu,needle", list(BAD_PACKING.values()), ids=list(BAD_PACKING))
def test_bad_packing_is_a_value_error(model, cu, needle):
    ids, _ = _batch()
    with pytest.raises(ValueError, match=needle):
        model.forward(ids, cu)


def test_bad_ids(model):
    with pytest.raises(ValueError, match="int64"):
        model.forward(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        model.forward(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[T\] or \[B, T\]"):
        model.logits(torch.zeros(1, 2, 3, dtype=torch.int64))


@pytest.mark.parametrize("rows", [[0, 4, 5, 13], [13, 2], list(range(14)), []],
                         ids=["some", "unordered", "all", "none"])
def test_layer_rows_are_the_full_layers_rows(model, rows):
    """A layer asked for some positions' outputs (the last layer of a drift or a generation step) gives those rows
    of the full layer: attention still reads every position's keys and values."""
    ids, cu = _batch()
    batch = model.prepare(ids, cu)
    h = model.embed(ids)
    for layer in model.layers[:-1]:
        h = layer(h, batch)
    idx = torch.tensor(rows, dtype=torch.int64)
    full = model.layers[-1](h, batch)
    got = model.layers[-1](h, batch, idx)
    assert got.shape == (len(rows), full.shape[1])
    if rows:
        assert_close(got, full[idx], 1e-6, "rows of the last layer")


def test_run_layers_rows(model):
    """run_layers(rows=...): index L's states and the returned ones are the chosen rows; earlier indices are whole."""
    from driftscope.engine.runner import run_layers

    ids, cu = _batch()
    idx = torch.tensor([1, 5, 6, 12], dtype=torch.int64)
    seen: dict[int, torch.Tensor] = {}
    (got,) = run_layers([model], ids, [model.prepare(ids, cu)], lambda i, h, _: seen.setdefault(i, h), idx)
    out = model.forward(ids, cu, output_hidden_states=True)
    assert_close(got, out.hidden[idx], 1e-6, "final states")
    L = len(model.layers)
    assert torch.equal(seen[L], got)
    for i in range(L):
        assert torch.equal(seen[i], out.hidden_states[i]), i


def test_forward_rows(model):
    ids, cu = _batch()
    idx = torch.tensor([13, 0, 7], dtype=torch.int64)
    assert_close(model.forward(ids, cu, rows=idx).hidden, model.forward(ids, cu).hidden[idx], 1e-6, "forward rows")
    with pytest.raises(ValueError, match="rows and output_hidden_states"):
        model.forward(ids, cu, output_hidden_states=True, rows=idx)


@pytest.mark.parametrize("fresh_rows", [5, 9])
def test_mlp_in_row_blocks_equals_the_whole(model, monkeypatch, fresh_rows):
    """Where oneDNN's GEMM returns its own outputs, the MLP runs in row blocks whose gate|up output stays within
    glibc's reuse limit (kernels.linear.row_block): the same states as one call over all rows, within rounding."""
    import driftscope.kernels.linear as lin

    if not lin._onednn_present():
        pytest.skip("this torch build has no oneDNN GEMM")
    monkeypatch.setenv("DRIFTSCOPE_CPU_GEMM", "onednn")
    ids, cu = _batch()
    whole = model.forward(ids, cu, output_hidden_states=True)
    inter = model.layers[0].mlp.inter
    monkeypatch.setattr(lin, "FRESH_BYTES", fresh_rows * 4 * 2 * inter)
    assert lin.row_block(torch.zeros(ids.shape[0], 8), 2 * inter) == fresh_rows
    calls = []
    mlp = type(model.layers[0].mlp)
    original = mlp._rows
    monkeypatch.setattr(mlp, "_rows", lambda self, x: calls.append(x.shape[0]) or original(self, x))
    split = model.forward(ids, cu, output_hidden_states=True)
    assert calls[: -(-ids.shape[0] // fresh_rows)] == [fresh_rows] * (ids.shape[0] // fresh_rows) + (
        [ids.shape[0] % fresh_rows] if ids.shape[0] % fresh_rows else [])
    for i, (a, b) in enumerate(zip(split.hidden_states, whole.hidden_states)):
        assert_close(a, b, 1e-6, f"state {i}")
