"""Prompts for generation: strings, token-id lists or chat messages, from Python or from records files.

`render_prompt` turns one prompt into (rendered text or None, token ids): messages always go through the checkpoint's
chat template (sandboxed), strings only with `chat=True` (as one user message, after an optional system prompt);
token-id lists are used as they are. Text is encoded without added special tokens: the rendered prompt is exactly
what the model sees (chat templates put BOS in the text where a model wants it).

`read_prompts(path, field=None)` reads JSONL / JSON / parquet records and takes each one's prompt from `field`, or
else from the first of `messages`, `input` (the paper's response files: an already rendered prompt, never templated
again), `prompt`, `question`, `problem`, `text`. A trailing assistant message (a drift records file) is dropped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from driftscope.engine.data import parse_objects
from driftscope.errors import InputError

Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]]]
PROMPT_FIELDS = ("messages", "input", "prompt", "question", "problem", "text")
RENDERED_FIELDS = ("input",)  # already chat-templated text: used verbatim


@dataclass(frozen=True)
class PromptRecord:
    where: str  # "path:line" or "path[i]"
    index: int  # ordinal of the record slot in its file (bad records included)
    prompt: Any  # str | list[int] | list[dict]
    rendered: bool  # True when the text is already a full rendered prompt (the `input` field)


def prompt_kind(prompt: Any, where: str) -> str:
    """'text', 'ids' or 'messages'; ValueError naming `where` for anything else."""
    if isinstance(prompt, str):
        return "text"
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return "ids"
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        for i, m in enumerate(prompt):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must have string 'role' and 'content'")
        return "messages"
    if isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and not prompt:
        raise ValueError(f"{where}: the prompt is an empty list")
    raise ValueError(f"{where}: a prompt must be a string, a list of token ids or a list of chat messages, "
                     f"got {type(prompt).__name__}")


def render_prompt(prompt: Any, tokenizer, where: str, *, chat: bool = False, system: str | None = None,
                  thinking: bool | None = None, chat_template_kwargs: Mapping | None = None,
                  rendered: bool = False) -> tuple[str | None, list[int]]:
    """(rendered prompt text or None for id prompts, prompt token ids)."""
    kind = prompt_kind(prompt, where)
    if kind == "ids":
        return None, [int(t) for t in prompt]
    if tokenizer is None:
        raise ValueError(f"{where}: text and chat prompts need a tokenizer (the checkpoint has no tokenizer.json)")
    if kind == "text" and (rendered or not chat):
        return prompt, tokenizer.encode(prompt, add_special_tokens=False)
    messages = [dict(m) for m in prompt] if kind == "messages" else [{"role": "user", "content": prompt}]
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                         tokenize=False, **dict(chat_template_kwargs or {}))
    return text, tokenizer.encode(text, add_special_tokens=False)


def _record_prompt(obj: Any, field: str | None) -> tuple[Any, bool]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"record is a {type(obj).__name__}, expected a JSON object")
    if field is not None:
        if field not in obj:
            raise ValueError(f"record has no field {field!r} (fields: {sorted(obj)[:8]})")
        name = field
    else:
        name = next((f for f in PROMPT_FIELDS if f in obj), None)
        if name is None:
            raise ValueError(f"record has none of the prompt fields {list(PROMPT_FIELDS)} (fields: {sorted(obj)[:8]}); "
                             "name one with --field")
    value = obj[name]
    if name == "messages" and isinstance(value, list) and value and isinstance(value[-1], Mapping) \
            and value[-1].get("role") == "assistant":
        value = value[:-1]  # a drift records file: the last message is the response
    if isinstance(value, str) and not value:
        raise ValueError(f"field {name!r} is empty")
    return value, name in RENDERED_FIELDS


def read_prompts(path: str | Path, field: str | None = None) -> tuple[list[PromptRecord], list[str]]:
    """(prompt records in file order, problems "where: why; record skipped" for bad records)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"prompts file {path} is a directory; pass the JSONL/JSON/parquet file in it")
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")

    def parse(obj: Any, where: str, index: int) -> PromptRecord:
        value, rendered = _record_prompt(obj, field)
        prompt_kind(value, where)
        return PromptRecord(where, index, value, rendered)
    return parse_objects(path, parse)
