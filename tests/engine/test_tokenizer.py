"""Tokenizer: encode/decode, special tokens, chat templates (sources, sandbox, parity with transformers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from driftscope.testing import CHAT_TEMPLATE, write_tokenizer
from driftscope.engine.tokenizer import ChatTemplateError, load_tokenizer
from driftscope.errors import InputError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2 + 2? Let me think step by step: 2 + 2 = 4.",
    "Bonjour, ça va? Größe, naïve café — unicode survives.",
] * 10

# A Qwen3-style template (the structure of Qwen3's own: reversed scan for the last query, <think> handling,
# enable_thinking tested with `is defined`, namespace, string methods).
# Qwen3's chat template verbatim: three of its lines are over 120 characters and cannot be wrapped without changing
# the template, hence the noqa at the end of the string.
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 -- verbatim template text (see above)

CONVERSATIONS = {
    "single-user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system-multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nthe user greets\n</think>\n\nHello."},
        {"role": "user", "content": "Größe?"},
    ],
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, vocab_size=320)


def _with_template(root: Path, dst: Path, template, *, jinja_file: str | None = None) -> Path:
    dst.mkdir()
    (dst / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    if template is None:
        cfg.pop("chat_template")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja_file is not None:
        (dst / "chat_template.jinja").write_text(jinja_file)
    return dst


def test_encode_decode_and_special_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "The quick brown fox — Größe."
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids) and tok.decode(ids) == text
    assert tok.vocab_size == 320
    assert tok.id_to_token(tok.eos_token_id) == "<|im_end|>"
    assert tok.id_to_token(tok.pad_token_id) == "<|endoftext|>"
    assert tok.bos_token_id is None
    assert tok.encode("<|im_start|>user")[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(tok.encode("<|im_end|>hi"), skip_special_tokens=True) == "hi"


def test_matches_transformers_encoding(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    tok = load_tokenizer(tok_dir)
    for text in CORPUS[:3] + ["<|im_start|>assistant\n<think>\n\n</think>\n\n"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert tok.eos_token_id == hf.eos_token_id and tok.pad_token_id == hf.pad_token_id


def test_generation_config_fills_missing_ids(tok_dir, tmp_path):
    d = _with_template(tok_dir, tmp_path / "t", "{{ 'x' }}")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    tok = load_tokenizer(d)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == (2, 0) and tok.bos_token_id == 1


@pytest.mark.parametrize("enable_thinking", [None, True, False], ids=lambda v: f"thinking-{v}")
@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=str)
def test_chat_template_matches_transformers(tok_dir, tmp_path, conv, enable_thinking):
    from transformers import AutoTokenizer

    d = _with_template(tok_dir, tmp_path / "t", QWEN3_TEMPLATE)
    tok, hf = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    messages = CONVERSATIONS[conv]
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    for gen_prompt in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, enable_thinking=enable_thinking)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt, **kw)
        assert ours == theirs, f"\nours:   {ours!r}\ntheirs: {theirs!r}"
    ids = tok.apply_chat_template(messages, enable_thinking=enable_thinking, tokenize=True)
    assert ids == tok.encode(tok.apply_chat_template(messages, enable_thinking=enable_thinking))
    if enable_thinking is False:
        assert ours.endswith("<|im_end|>\n") and "<think>\n\n</think>" in tok.apply_chat_template(
            messages, enable_thinking=False)


def test_enable_thinking_reaches_template_only_when_set(tok_dir, tmp_path):
    d = _with_template(tok_dir, tmp_path / "t", "{{ enable_thinking is defined }}")
    tok = load_tokenizer(d)
    assert tok.apply_chat_template([], enable_thinking=None) == "False"
    assert tok.apply_chat_template([], enable_thinking=False) == "True"


def test_template_helpers_and_special_token_strings(tok_dir, tmp_path):
    src = "{{ eos_token }}|{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}|{{ extra }}"
    d = _with_template(tok_dir, tmp_path / "t", src)
    out = load_tokenizer(d).apply_chat_template([{"role": "user", "content": "é<b>"}], extra=7)
    assert out == '<|im_end|>|{"role": "user", "content": "é<b>"}|4|7'  # tojson: no ascii/HTML escaping
    d2 = _with_template(tok_dir, tmp_path / "t2", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match=r"tokenizer_config.json: chat template line 1: roles must alternate"):
        load_tokenizer(d2).apply_chat_template([])


def test_template_sources_in_order_of_preference(tok_dir, tmp_path):
    d = _with_template(tok_dir, tmp_path / "a", "from-config", jinja_file="from-jinja-file")
    assert load_tokenizer(d).apply_chat_template([]) == "from-jinja-file"
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    d = _with_template(tok_dir, tmp_path / "b", named)
    tok = load_tokenizer(d)
    assert tok.apply_chat_template([]) == "D" and tok.apply_chat_template([], chat_template="tool_use") == "T"
    assert load_tokenizer(tok_dir).chat_template["default"] == CHAT_TEMPLATE


SANDBOX_ESCAPES = {
    "dunder-mro": "{{ ''.__class__.__mro__ }}",
    "func-globals": "{{ raise_exception.__globals__['os'] }}",
    "mutate-list": "{{ messages.append({'role': 'x'}) }}",
    "mutate-dict": "{% set _ = messages[0].update({'content': 'pwned'}) %}",
    "namespace-dunder": "{% set ns = namespace(__class__=1) %}",
}


@pytest.mark.parametrize("source", list(SANDBOX_ESCAPES.values()), ids=list(SANDBOX_ESCAPES))
def test_sandbox_refuses_python_internals(tok_dir, tmp_path, source):
    d = _with_template(tok_dir, tmp_path / "t", source)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: chat template line 1: the sandbox blocks"):
        load_tokenizer(d).apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_clear_errors(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    d = _with_template(tok_dir, tmp_path / "none", None)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(d).apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        load_tokenizer(tok_dir).apply_chat_template(["hi"])
    bad = _with_template(tok_dir, tmp_path / "bad", "x")
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|nope|>"
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        load_tokenizer(bad)
