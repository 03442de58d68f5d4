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


def _mc_pairs(vocab: int, seed: int = 2):
    """Multiple-choice shape: contexts with several continuations (1-token ones, a duplicate, a long one)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    pairs = []
    for ctx_len, cont_lens in [(12, [1, 3, 1, 5]), (3, [2, 2]), (25, [7]), (1, [1, 4, 2]), (9, [3, 3, 3, 3, 3])]:
        ctx = r(ctx_len)
        conts = [r(n) for n in cont_lens]
        pairs += [(ctx, c) for c in conts]
    pairs.append(pairs[1])  # an exact duplicate
    return pairs


@pytest.mark.parametrize("max_tree,max_batch_tokens", [(2048, 8192), (16, 8192), (1, 20), (40, 1)])
def test_shared_prefix_trees_equal_the_reference(ckpt, max_tree, max_batch_tokens):
    model = load_model(ckpt)
    pairs = _mc_pairs(model.config.vocab_size)
    ours = score_continuations(model, pairs, max_tree=max_tree, max_batch_tokens=max_batch_tokens, head_rows=5)
    ref = score_continuations_torch(model, pairs)
    flat = score_continuations(model, pairs, share_prefix=False)
    for (a, ga), (b, gb), (c, gc) in zip(ours, ref, flat):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and a == pytest.approx(c, rel=1e-5, abs=1e-5)
        assert ga == gb == gc


def test_tree_attention_equals_its_reference():
    from driftscope.kernels.attention import tree_attention, tree_attention_torch

    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 1, 7]
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, 16, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 14, 15, 22], dtype=torch.int32)
    m9 = torch.ones(9, 9, dtype=torch.bool).tril()
    m9[6:, 3:6] = False  # a second branch that does not see the first
    m7 = torch.rand(7, 7, generator=g) < 0.5
    m7 |= torch.eye(7, dtype=torch.bool)  # every query sees at least itself
    masks = (None, m9, None, m7)
    out = tree_attention(q, k, v, cu, 9, 0.25, masks)
    ref = tree_attention_torch(q, k, v, cu, 9, 0.25, masks)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
