"""Prompts for generation: strings, token-id lists or chat messages.

`render_prompt` turns one prompt into (rendered text or None, token ids): messages always go through the checkpoint's
chat template (sandboxed), strings only with `chat=True` (as one user message, after an optional system prompt);
token-id lists are used as they are. Text is encoded without added special tokens: the rendered prompt is exactly
what the model sees (chat templates put BOS in the text where a model wants it). Prompt files are read by
`driftscope.records.read_prompts`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union


Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]]]


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
