"""When a sequence stops, and its final text: EOS ids, stop token ids, stop strings, max_new_tokens, the context.

Stop strings are matched on the incrementally decoded text of the generated tokens, so a stop string split across
tokens is caught the step its last piece arrives; the text is then trimmed before the stop string's first occurrence.
`finish_reason` is "eos", "stop" (a stop string or a stop token id), "length" (max_new_tokens) or "context" (the
model's context is full); `stop_reason` is the EOS id, stop token id or stop string that ended it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalText:
    """Decoded text of a growing token list, O(window) per token.

    Decodes from `prefix` (a token boundary a few tokens back) and appends what the newest tokens add beyond the
    text of ids[prefix:read]; an incomplete UTF-8 character (decoded as U+FFFD) waits for the next token. Decoding
    from a boundary rather than from the start gives byte-level and SentencePiece tokenizers their context."""

    def __init__(self, tokenizer: Decoder):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self._prefix:self._read])
        after = self.tok.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new


class StopChecker:
    """Per-sequence stopping state: `check(token_id, n_generated, total_len)` -> (finish_reason, stop_reason) | None."""

    def __init__(self, eos_ids: Sequence[int], stop_token_ids: Sequence[int], stop: Sequence[str], max_new_tokens: int,
                 max_len: int, tokenizer: Decoder | None):
        self.eos = frozenset(eos_ids)
        self.stop_ids = frozenset(stop_token_ids)
        self.stop = tuple(stop)
        self.max_new_tokens, self.max_len = max_new_tokens, max_len
        if self.stop and tokenizer is None:
            raise ValueError(f"stop strings {list(self.stop)} need a tokenizer to decode the generated text")
        self.text = IncrementalText(tokenizer) if self.stop else None
        self._longest = max((len(s) for s in self.stop), default=0)

    def check(self, token_id: int, n_generated: int, total_len: int) -> tuple[str, int | str] | None:
        if token_id in self.eos:
            return "eos", token_id
        if token_id in self.stop_ids:
            return "stop", token_id
        if self.text is not None:
            old = len(self.text.text)
            if self.text.push(token_id):
                window = self.text.text[max(0, old - self._longest + 1):]  # only where a new match can end
                hits = [s for s in self.stop if s in window]
                if hits:
                    return "stop", min(hits, key=lambda s: window.find(s))
        if n_generated >= self.max_new_tokens:
            return "length", None
        if total_len >= self.max_len:
            return "context", None
        return None


def final_text(tokenizer: Decoder, token_ids: Sequence[int], finish_reason: str | None,
               stop_reason: int | str | None, stop: Sequence[str]) -> str:
    """Text of the generated tokens: a terminating EOS or stop token id left out, cut before the first stop string."""
    ids = list(token_ids)
    if finish_reason in ("eos", "stop") and isinstance(stop_reason, int) and ids and ids[-1] == stop_reason:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    if finish_reason == "stop" and isinstance(stop_reason, str):
        cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
        if cuts:
            text = text[:min(cuts)]
    return text
