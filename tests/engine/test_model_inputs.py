"""The forward's input checks: cu_seqlens (and input_ids) given as a list of ints is taken as the tensor would be;
anything else a caller can pass is one InputError line naming the argument, what was given and what is expected."""
from __future__ import annotations

import pytest
import torch

from driftscope.engine.loader import load_model
from driftscope.testing import random_checkpoint
from driftscope.errors import InputError

LENGTHS = [5, 1, 8]
CU = [0, 5, 6, 14]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    random_checkpoint(path, "qwen3", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=96)
    return load_model(path)


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (sum(LENGTHS),), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cu", [CU, tuple(CU), torch.tensor(CU, dtype=torch.int64)], ids=["list", "tuple", "int64"])
def test_cu_seqlens_as_a_list_or_int64_equals_the_int32_tensor(model, cu):
    ids, want = _ids(), torch.tensor(CU, dtype=torch.int32)
    ref = model(ids, want, output_hidden_states=True)
    got = model(ids, cu, output_hidden_states=True)
    assert torch.equal(got.hidden, ref.hidden)
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, ref.hidden_states))
    batch = model.prepare(ids, cu)
    assert batch.cu_seqlens.dtype == torch.int32 and torch.equal(batch.cu_seqlens, want)


def test_input_ids_as_a_list_equals_the_tensor(model):
    ids = _ids()
    assert torch.equal(model(ids.tolist(), CU).hidden, model(ids, torch.tensor(CU, dtype=torch.int32)).hidden)
    assert torch.equal(model.logits(ids.tolist()), model.logits(ids))


def test_prepare_tree_takes_a_list_too(model):
    ids, pos = _ids(), torch.cat([torch.arange(n) for n in LENGTHS])
    masks = (None, None, None)
    a = model.prepare_tree(ids, CU, pos, masks)
    b = model.prepare_tree(ids, torch.tensor(CU, dtype=torch.int32), pos, masks)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens) and torch.equal(a.cos, b.cos)


BAD_CU = {  # what is given -> what the message must show of it
    "floats": ([0, 5.0, 14], "got list [0, 5.0, 14]"),
    "bools": ([False, True], "got list [False, True]"),
    "nested": ([[0, 14]], "got list [[0, 14]]"),
    "string": ("0,14", "got str '0,14'"),
    "numpy": (pytest.importorskip("numpy").array([0, 14]), "got ndarray array([ 0, 14])"),
    "float-tensor": (torch.tensor([0.0, 14.0]), "got a torch.float32 tensor of shape (2,)"),
    "2-d": (torch.tensor([[0, 14]]), "got a torch.int64 tensor of shape (1, 2)"),
    "one-entry": ([0], "got [0]"),
    "empty": ([], "got []"),
    "decreasing": ([0, 9, 5, 14], "got [0, 9, 5, 14]"),
    "short-total": ([0, 13], "got [0, 13]"),
    "not-from-zero": (torch.tensor([1, 14], dtype=torch.int32), "got [1, 14]"),
}


@pytest.mark.parametrize("entry", ["forward", "prepare"])
@pytest.mark.parametrize("cu,shown", list(BAD_CU.values()), ids=list(BAD_CU))
def test_bad_cu_seqlens_is_one_line_naming_it(model, cu, shown, entry):
    with pytest.raises(InputError) as e:
        (model if entry == "forward" else model.prepare)(_ids(), cu)
    msg = str(e.value)
    assert msg.startswith("cu_seqlens must be a 1-D int32/int64 tensor or a list of ints [B+1] that start at 0, are "
                          "non-decreasing and end at T=14 = len(input_ids); "), msg
    assert msg.endswith(shown) and "\n" not in msg, msg


BAD_IDS = {
    "over-vocab": ([1, 300, 2], "input_ids holds token id 300, outside the vocabulary [0, 300) of "),
    "negative": (torch.tensor([4, -1]), "input_ids holds token id -1, outside the vocabulary [0, 300) of "),
    "string": ("hello", "input_ids must be a 1-D int64 tensor or a list of token ids [T]; got str 'hello'"),
    "float-list": ([1.0, 2.0], "input_ids must be a 1-D int64 tensor or a list of token ids [T]; got list [1.0, 2.0]"),
    "empty-list": ([], "input_ids is empty"),
}


@pytest.mark.parametrize("ids,start", list(BAD_IDS.values()), ids=list(BAD_IDS))
def test_bad_input_ids_is_one_line_naming_them(model, ids, start):
    with pytest.raises(InputError) as e:
        model(ids)
    assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)
