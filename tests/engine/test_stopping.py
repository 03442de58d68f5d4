"""Stopping: incremental detokenization equals a full decode, stop strings split across tokens are caught at the
token that completes them and trimmed, EOS / stop ids / length / context give their finish_reason; end to end on a
tiny model with a trained tokenizer."""
from __future__ import annotations

import pytest

import driftscope
from driftscope.engine.stopping import IncrementalText, StopChecker, final_text
from driftscope.testing import random_checkpoint, write_tokenizer
from driftscope.engine.tokenizer import load_tokenizer

CORPUS = [
    "The answer is 42.\n\nQuestion: what is six times seven? Größe, naïve café — 日本語のテキスト.",
    "Let me think step by step. Final Answer: \\boxed{7}\n\nQuestion: and then?",
] * 20
TEXTS = ["The answer is 42.\n\nQuestion: what", "naïve café — 日本語", "\\boxed{7}\n\nQuestion: and then?"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stop-model")
    write_tokenizer(d, CORPUS, vocab_size=400)
    random_checkpoint(d, "qwen3", vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, seed=3)
    return d


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_the_full_decode(tok_dir, text):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text)
    inc = IncrementalText(tok)
    for i, t in enumerate(ids):
        inc.push(t)
        assert tok.decode(ids[: i + 1]).startswith(inc.text), f"after token {i}: {inc.text!r}"
    assert inc.text == tok.decode(ids) == text


def test_a_stop_string_split_across_tokens_is_caught_when_it_completes(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "The answer is 42.\n\nQuestion: what"
    ids = tok.encode(text)
    stop = "\n\nQuestion:"
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    done_at = next(i for i, p in enumerate(pieces) if stop in p)
    assert stop not in pieces[done_at - 1] and stop[0] in pieces[done_at - 1][len("The answer is 42."):], \
        "the fixture must split the stop string across tokens"
    checker = StopChecker(eos_ids=[], stop_token_ids=[], stop=[stop], max_new_tokens=100, max_len=1000, tokenizer=tok)
    hits = [checker.check(t, i + 1, i + 1) for i, t in enumerate(ids)]
    assert hits[done_at] == ("stop", stop) and all(h is None for h in hits[:done_at])
    assert final_text(tok, ids[: done_at + 1], "stop", stop, [stop]) == "The answer is 42."


def test_stop_checks_in_order_eos_first_then_length_then_context(tok_dir):
    tok = load_tokenizer(tok_dir)
    c = StopChecker(eos_ids=[5], stop_token_ids=[6], stop=[], max_new_tokens=3, max_len=10, tokenizer=None)
    assert c.check(5, 3, 10) == ("eos", 5)
    assert c.check(6, 1, 2) == ("stop", 6)
    assert c.check(7, 3, 10) == ("length", None)
    assert c.check(7, 2, 10) == ("context", None)
    assert c.check(7, 2, 9) is None
    assert final_text(tok, tok.encode("hi") + [tok.token_to_id("<|im_end|>")], "eos",
                      tok.token_to_id("<|im_end|>"), []) == "hi"
    with pytest.raises(ValueError, match="need a tokenizer"):
        StopChecker(eos_ids=[], stop_token_ids=[], stop=["x"], max_new_tokens=3, max_len=10, tokenizer=None)


def test_generate_trims_a_stop_string_that_spans_a_token_boundary(tok_dir):
    """End to end: take a free run's text, choose a stop string across a token boundary, run again with it."""
    tok = load_tokenizer(tok_dir)
    for prompt in ("The answer", "Question:", "Let me think", "café"):
        (free,) = driftscope.generate(tok_dir, [prompt], max_new_tokens=40, ignore_eos=True, progress=False)
        ids = free.token_ids
        bounds = [len(tok.decode(ids[:i])) for i in range(len(ids) + 1)]
        text = tok.decode(ids)
        for i in range(2, len(ids)):  # stop = last 2 chars of tokens < i + first 2 chars of token i
            a, b = bounds[i], bounds[i + 1]
            if bounds[i] - bounds[i - 1] < 2 or b - a < 2:
                continue
            stop = text[a - 2:a + 2]
            if not stop.isprintable() or "\ufffd" in stop or text.find(stop) != a - 2:
                continue
            (cut,) = driftscope.generate(tok_dir, [prompt], max_new_tokens=40, ignore_eos=True, stop=[stop],
                                         progress=False)
            assert cut.finish_reason == "stop" and cut.stop_reason == stop
            assert cut.token_ids == ids[: i + 1], "generation must stop at the token that completes the stop string"
            assert cut.text == text[: a - 2]
            return
    pytest.fail("no prompt gave a text with a printable stop-string candidate across a token boundary")
