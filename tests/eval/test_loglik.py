"""eval.loglik.score_continuations against its one-sequence float64 reference and against transformers."""
from __future__ import annotations

import pytest
import torch

from driftscope.engine.loader import load_model
from driftscope.eval.loglik import score_continuations, score_continuations_torch
from eval_helpers import write_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("loglik"))


def _pairs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 1), (5, 3), (17, 1), (2, 9), (30, 12), (8, 8), (1, 20), (40, 2)]
    return [(torch.randint(0, vocab, (a,), generator=g).tolist(), torch.randint(0, vocab, (b,), generator=g).tolist())
            for a, b in shapes]


@pytest.mark.parametrize("max_batch_tokens,head_rows", [(8192, 512), (16, 3), (1, 1)])
def test_packed_equals_one_at_a_time_reference(ckpt, max_batch_tokens, head_rows):
    model = load_model(ckpt)
    pairs = _pairs(model.config.vocab_size)
    ours = score_continuations(model, pairs, max_batch_tokens=max_batch_tokens, head_rows=head_rows)
    ref = score_continuations_torch(model, pairs)
    for (a, ga), (b, gb) in zip(ours, ref):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
        assert ga == gb


def test_context_is_cut_from_the_left_like_lm_eval(ckpt):
    model = load_model(ckpt)
    ctx, cont = list(range(10, 40)), list(range(50, 60))
    full = score_continuations(model, [(ctx, cont)], max_length=16)[0][0]
    # by hand: the last 17 tokens, fed 16, all 10 continuation tokens scored
    ids = (ctx + cont)[-17:]
    lsm = model.logits(torch.tensor(ids[:-1])).double().log_softmax(-1)
    expect = float(sum(lsm[len(ids) - 1 - 10 + k, cont[k]] for k in range(10)))
    assert full == pytest.approx(expect, rel=1e-6)
    long_cont = score_continuations(model, [([1, 2], list(range(60, 90)))], max_length=16)[0][0]
    ids = ([1, 2] + list(range(60, 90)))[-17:]
    lsm = model.logits(torch.tensor(ids[:-1])).double().log_softmax(-1)
    assert long_cont == pytest.approx(float(sum(lsm[k, ids[k + 1]] for k in range(16))), rel=1e-6)


def test_greedy_flag_is_true_for_the_models_own_argmax_path(ckpt):
    model = load_model(ckpt)
    ctx = [5, 6, 7]
    path = list(ctx)
    for _ in range(4):
        path.append(int(model.logits(torch.tensor(path))[-1].argmax()))
    logp, greedy = score_continuations(model, [(ctx, path[3:])])[0]
    assert greedy and logp < 0
    other = (path[-1] + 1) % model.config.vocab_size
    assert score_continuations(model, [(ctx, path[3:-1] + [other])])[0][1] is False


def test_equals_transformers_float64(ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64).eval()
    model = load_model(ckpt)
    pairs = _pairs(model.config.vocab_size, seed=1)
    ours = score_continuations(model, pairs, max_batch_tokens=64)
    for (ctx, cont), (logp, greedy) in zip(pairs, ours):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lsm = hf(ids).logits[0].log_softmax(-1)
        pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
        ref = float(sum(lsm[p, t] for p, t in zip(pos, cont)))
        assert logp == pytest.approx(ref, rel=2e-5, abs=2e-5)
        assert greedy == all(int(lsm[p].argmax()) == t for p, t in zip(pos, cont))


def test_bad_pairs_are_refused(ckpt):
    model = load_model(ckpt)
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(model, [([1], [])])
    with pytest.raises(ValueError, match="context is empty"):
        score_continuations(model, [([], [1])])
