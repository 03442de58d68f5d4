"""Shared-prefix batches (engine.data.share_prefix, Transformer.prepare(prefix=)): the samples' common token prefix
runs once per batch, and every scored row's states equal the unshared batch's within float32 rounding."""
from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import assert_close

from driftscope.engine.data import Sample, pack_batches, share_prefix
from driftscope.engine.loader import load_model
from driftscope.engine.runner import run_layers
from driftscope.testing import random_checkpoint

V = 300


def _model(root, arch="qwen3", **config):
    random_checkpoint(root, arch, vocab_size=V, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=96)
    cfg = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(cfg | config))
    return load_model(root)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("m"))


def _samples(prefix: list[int], tails: list[int], n_prompt: list[int], seed: int = 0) -> list[Sample]:
    """Samples = the common prefix ++ a random tail each; n_prompt counts the prefix."""
    g = torch.Generator().manual_seed(seed)
    return [Sample(i, torch.tensor(prefix + torch.randint(0, V, (n,), generator=g).tolist()), p)
            for i, (n, p) in enumerate(zip(tails, n_prompt))]


def _batch(prefix_len=7, tails=(9, 4, 12, 6), extra_prompt=(2, 1, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    prefix = torch.randint(0, V, (prefix_len,), generator=g).tolist()
    (b,) = pack_batches(_samples(prefix, list(tails), [prefix_len + e for e in extra_prompt], seed), 10_000)
    return b


def test_share_prefix_layout():
    b = _batch()
    s = share_prefix(b)
    assert s.prefix == 7
    assert s.n_tokens == b.n_tokens - 3 * 7
    lens = (s.cu_seqlens[1:] - s.cu_seqlens[:-1]).tolist()
    assert lens == [7, 9, 4, 12, 6]  # the prefix, then each sample's rows after it
    assert torch.equal(s.input_ids[:7], b.input_ids[:7])
    for name in ("scored_targets", "scored_sample_ids", "scored_first"):
        assert torch.equal(getattr(s, name), getattr(b, name)), name
    assert not s.score_mask[:7].any() and (s.token_sample_ids[:7] == -1).all()
    assert s.max_seqlen == b.max_seqlen
    assert share_prefix(s) is s  # already shared


def test_share_prefix_stops_before_the_first_scored_row_and_where_samples_differ():
    # sample 3 has no prompt beyond 3 prefix tokens: its first scored row is 2, so only rows 0..1 can be shared
    b = _batch(prefix_len=6, extra_prompt=(2, 1, 3, -3))
    assert share_prefix(b, min_share=0).prefix == 2
    # tails equal in their first token: the prefix grows by it only if every sample has it
    g = torch.Generator().manual_seed(5)
    pre = torch.randint(0, V, (5,), generator=g).tolist()
    same = [Sample(i, torch.tensor(pre + [7] + t), 8) for i, t in enumerate([[1, 2, 3, 4], [9, 9, 9], [4, 4, 4, 4]])]
    (b,) = pack_batches(same, 10_000)
    assert share_prefix(b).prefix == 6
    same[1] = Sample(1, torch.tensor(pre + [8, 9, 9, 9]), 8)
    (b,) = pack_batches(same, 10_000)
    assert share_prefix(b).prefix == 5


def test_share_prefix_leaves_batches_it_cannot_help():
    one = _batch(tails=(9,), extra_prompt=(1,))
    assert share_prefix(one) is one  # one sample
    b = _batch(prefix_len=1, tails=(40, 40), extra_prompt=(2, 2))
    assert share_prefix(b) is b  # 1 row saved of 84: below min_share
    assert share_prefix(b, min_share=0).prefix == 1
    (nothing,) = pack_batches([Sample(0, torch.tensor([1, 2, 3]), 2), Sample(1, torch.tensor([4, 2, 3]), 2)], 100)
    assert share_prefix(nothing, min_share=0) is nothing


def _states(model, b, rows):
    seen = {}
    (final,) = run_layers([model], b.input_ids, [model.prepare(b.input_ids, b.cu_seqlens, b.prefix)],
                          lambda i, h, _: seen.setdefault(i, h.index_select(0, rows) if i < len(model.layers)
                                                           else h), rows)
    return seen, final


def _compare(model, b, s, what):
    rows = b.score_mask.nonzero().squeeze(1)
    rows_s = s.score_mask.nonzero().squeeze(1)
    seen, final = _states(model, b, rows)
    seen_s, final_s = _states(model, s, rows_s)
    for i in seen:
        assert_close(seen_s[i], seen[i], 2e-6, f"{what}: states at index {i}")
    assert_close(final_s, final, 2e-6, f"{what}: final states")


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_forward_equals_the_unshared(model, seed):
    b = _batch(prefix_len=5 + seed * 4, seed=seed)
    s = share_prefix(b)
    assert s.prefix > 0
    _compare(model, b, s, f"seed {seed}")


def test_shared_forward_with_a_sliding_window(tmp_path):
    """A window shorter than the prefix: the samples' late rows no longer see its first keys."""
    m = _model(tmp_path, "mistral", sliding_window=4)
    assert tuple(m.config.layer_windows) == (4, 4, 4)
    b = _batch(prefix_len=8)
    _compare(m, b, share_prefix(b), "window 4")


def test_shared_forward_runs_the_prefix_once(model, monkeypatch):
    """The MLPs see the shared batch's rows, not the whole samples'."""
    b = _batch()
    s = share_prefix(b)
    seen = []
    for layer in model.layers:
        monkeypatch.setattr(layer.mlp, "forward", lambda x, f=layer.mlp.forward: seen.append(x.shape[0]) or f(x))
    _states(model, s, s.score_mask.nonzero().squeeze(1))
    assert seen[:-1] == [s.n_tokens] * (len(model.layers) - 1) and seen[-1] == int(s.score_mask.sum())


def test_prepare_refuses_a_bad_prefix(model):
    b = share_prefix(_batch())
    with pytest.raises(ValueError, match="sequence 0 must be the prefix"):
        model.prepare(b.input_ids, b.cu_seqlens, b.prefix + 1)


def test_rope_that_depends_on_the_length_is_not_shared(tmp_path):
    from driftscope.engine.runner import LockstepRunner

    m = _model(tmp_path, "llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
               max_position_embeddings=16)
    assert not LockstepRunner(m, [m]).can_share_prefix
    b = share_prefix(_batch())
    with pytest.raises(ValueError, match="depends on the sequence length"):
        m.prepare(b.input_ids, b.cu_seqlens, b.prefix)
