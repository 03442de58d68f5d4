"""driftscope.generate: prompts as strings, token ids and chat messages; chat rendering with a system prompt and
thinking on/off; ordering of (prompt, sample); one-line errors that name the bad value."""
from __future__ import annotations

import pytest

import driftscope
from driftscope.engine.loader import load_model
from driftscope.testing import random_checkpoint, write_tokenizer
from driftscope.engine.tokenizer import load_tokenizer

CORPUS = ["hello world, this is a small test corpus for a tiny tokenizer with words and numbers 1 2 3"] * 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen-api")
    write_tokenizer(d, CORPUS, vocab_size=320)
    random_checkpoint(d, "qwen3", vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, seed=2)
    return d


def test_prompts_of_every_kind_in_one_call(ckpt):
    tok = load_tokenizer(ckpt)
    msgs = [{"role": "user", "content": "hello world"}]
    ids = tok.encode("this is")
    gens = driftscope.generate(ckpt, ["hello", ids, msgs], max_new_tokens=5, n=2, temperature=1.0, seed=1,
                               system="be brief", thinking=False, progress=False)
    assert [(g.index, g.sample) for g in gens] == [(i, s) for i in range(3) for s in range(2)]
    assert gens[0].prompt == "hello" and gens[0].prompt_token_ids == tok.encode("hello")  # no chat: raw text
    assert gens[2].prompt is None and gens[2].prompt_token_ids == ids  # token ids as they are
    rendered = tok.apply_chat_template([{"role": "system", "content": "be brief"}, *msgs], enable_thinking=False)
    assert gens[4].prompt == rendered and rendered.endswith("<think>\n\n</think>\n\n")
    assert all(len(g.token_ids) == 5 and g.finish_reason == "length" for g in gens)
    assert all(g.text == tok.decode(g.token_ids) for g in gens)


def test_chat_for_string_prompts_and_a_loaded_model(ckpt):
    model = load_model(ckpt)
    (g,) = driftscope.generate(model, ["hello"], max_new_tokens=3, chat=True, thinking=True, progress=False)
    assert g.prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    (same,) = driftscope.generate(ckpt, ["hello"], max_new_tokens=3, chat=True, thinking=True, progress=False)
    assert same.token_ids == g.token_ids


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, r"prompts is empty"),
    ("hello", {}, r"prompts must be a list of prompts, got str"),
    ([""], {}, r"prompts\[0\]: the prompt is empty"),
    (["ok", [1] * 5000], {}, r"prompts\[1\]: the prompt has 5000 tokens, which leaves no room .* context of 4096"),
    (["ok", [1, 999]], {}, r"prompts\[1\]: token id 999 is outside the vocabulary \[0, 320\)"),
    (["ok", 3.5], {}, r"prompts\[1\]: a prompt must be a string, a list of token ids or a list of chat messages"),
    ([[{"role": "user"}]], {}, r"prompts\[0\]: messages\[0\] must have string 'role' and 'content'"),
    (["ok"], {"max_new_tokens": 0}, r"max_new_tokens=0 is invalid"),
    (["ok"], {"top_p": 1.5}, r"top_p=1.5 is invalid"),
    (["ok"], {"temperature": -0.1}, r"temperature=-0.1 is invalid"),
    (["ok"], {"top_k": -2}, r"top_k=-2 is invalid"),
    (["ok"], {"max_num_seqs": 0}, r"max_num_seqs=0 is invalid"),
    (["ok"], {"cache_memory": 10}, r"cache_memory=10 bytes holds 0 tokens"),
], ids=["empty", "not-a-list", "empty-prompt", "too-long", "bad-id", "bad-type", "bad-message", "max_new_tokens",
        "top_p", "temperature", "top_k", "max_num_seqs", "tiny-cache"])
def test_bad_input_is_one_clear_error(ckpt, prompts, kw, match):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match) as e:
        driftscope.generate(ckpt, prompts, progress=False, **kw)
    assert "\n" not in str(e.value)


def test_missing_checkpoint_and_file_are_named(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        driftscope.generate(tmp_path / "nope", ["x"], max_new_tokens=2)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="file is a file but not a GGUF file"):
        driftscope.generate(f, ["x"], max_new_tokens=2)


def test_token_id_prompts_need_no_tokenizer(tmp_path):
    random_checkpoint(tmp_path, "llama", vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      intermediate_size=64)
    (g,) = driftscope.generate(tmp_path, [[1, 2, 3]], max_new_tokens=4, progress=False)
    assert g.text is None and len(g.token_ids) == 4
    with pytest.raises(ValueError, match="need a tokenizer"):
        driftscope.generate(tmp_path, ["text"], max_new_tokens=4, progress=False)
