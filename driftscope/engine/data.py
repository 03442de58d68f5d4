"""Records -> tokenized `Sample`s -> token-budget `PackedBatch`es (cu_seqlens, no padding) for a drift run.

Bad records are skipped but never silently: each is reported as "file:line: why" in `problems`, and logged (a file's
unreadable records in one line, see `skipped`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from driftscope.engine.tokenizer import ChatTemplateError
from driftscope.errors import InputError

__all__ = [
    "Record", "Sample", "PackedBatch", "read_records", "detect_format", "record_texts",
    "tokenize_records", "load_samples", "pack_batches", "next_fit", "OVERLONG", "fit_context", "fit_prompts", "skipped",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
OVERLONG = ("error", "truncate")  # what to do with records longer than the models' context

# Auto-detection order: the first field set a record has wins.
FORMATS: dict[str, tuple[str, ...]] = {
    "input_output": ("input", "output"),      # the paper's response files: chat-templated prompt + continuation
    "prompt_response": ("prompt", "response"),
    "messages": ("messages",),                # chat; the last message must be the assistant's response
    "text": ("text",),                        # everything scored (except the first token, which has no context)
}


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class Record:
    """One raw record. `prompt` is None for the messages format (templated later with a tokenizer)."""
    fmt: str
    prompt: str | None
    response: str
    messages: tuple | None
    where: str   # "path:line" (JSONL) or "path[i]" (JSON list / parquet row)
    index: int   # 0-based ordinal of the record in its file, bad records included (stable sample ids)
    prompt_ids: tuple[int, ...] | None = None    # "input_token_ids": used instead of encoding the prompt
    response_ids: tuple[int, ...] | None = None  # "output_token_ids" (driftscope generate): the ids to score


@dataclass(frozen=True, eq=False)
class Sample:
    """Tokenized sample: input_ids [L] int64 = prompt tokens ++ response tokens; the first n_prompt are prompt.

    Scored positions (the target of position t is token t+1): max(n_prompt, 1) − 1 … L − 2, i.e. exactly the
    positions that predict a response token; with no prompt the first token has no context and is not scored.
    """
    sample_id: int
    input_ids: torch.Tensor
    n_prompt: int
    where: str = ""
    truncated: bool = False

    @property
    def first_scored(self) -> int:
        return max(self.n_prompt, 1) - 1

    @property
    def n_scored(self) -> int:
        return max(len(self.input_ids) - 1 - self.first_scored, 0)


# ---- reading --------------------------------------------------------------------------------------------------
def detect_format(obj: Any) -> str:
    """Name of the record's format (see FORMATS); ValueError naming what is missing or mistyped."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"record is a {type(obj).__name__}, expected a JSON object")
    for fmt, keys in FORMATS.items():
        if all(k in obj for k in keys):
            return fmt
    present = sorted(obj)[:8]
    raise ValueError(f"record has none of the field sets {[list(k) for k in FORMATS.values()]} (fields: {present})")


def _parse(obj: Any, where: str, index: int) -> Record:
    fmt = detect_format(obj)
    if fmt == "messages":
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("field 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the assistant response, got role {msgs[-1]['role']!r}")
        if not msgs[-1]["content"]:
            raise ValueError("the assistant response (last message content) is empty")
        return Record(fmt, None, msgs[-1]["content"], tuple(dict(m) for m in msgs), where, index)
    keys = FORMATS[fmt]
    for k in keys:
        if not isinstance(obj[k], str):
            raise ValueError(f"field {k!r} must be a string, got {type(obj[k]).__name__}")
    if fmt == "text":
        prompt, response = "", obj["text"]
    else:
        prompt, response = obj[keys[0]], obj[keys[1]]
    prompt_ids, response_ids = _ids_field(obj, "input_token_ids"), _ids_field(obj, "output_token_ids")
    if not response and not response_ids:
        raise ValueError(f"field {keys[-1]!r} is empty: nothing to score")
    if fmt == "input_output" and not prompt and not prompt_ids:
        raise ValueError("field 'input' is empty (the paper's script skips such records too)")
    return Record(fmt, prompt, response, None, where, index, prompt_ids, response_ids)


def _ids_field(obj: Mapping, name: str) -> tuple[int, ...] | None:
    """An optional list of token ids (what `driftscope generate` writes beside the text)."""
    if name not in obj or obj[name] is None:
        return None
    v = obj[name]
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise ValueError(f"field {name!r} must be a list of token ids (integers >= 0)")
    return tuple(v)


def raw_objects(path: Path) -> Iterable[tuple[str, Any, str | None]]:
    """Yield (where, object or None, parse error or None) for each record slot of a JSONL, JSON-list or parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path}: reading parquet needs pyarrow, which is not installed "
                              "(pip install pyarrow), or convert the file to JSONL") from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[{i}]", row, None
        return
    data = path.read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the first record
    if data.lstrip().startswith(b"["):  # a JSON list; one bad item cannot be skipped without the others
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON list ({e.msg})") from e
        for i, obj in enumerate(items):
            yield f"{path}[{i}]", obj, None
        return
    # split on b"\n" only: str.splitlines would also split inside strings holding U+2028, U+0085, ...
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines are not records
        try:
            yield f"{path}:{lineno}", json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as e:
            yield f"{path}:{lineno}", None, f"not valid UTF-8 (byte {e.start} of the line)"
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", None, f"invalid JSON ({e.msg} at column {e.colno})"


def read_records(path: str | Path) -> tuple[list[Record], list[str]]:
    """Read JSONL, a JSON list, or parquet (with pyarrow); formats auto-detected per record.

    Returns (records, problems); each problem is "path:line: why" (logged as in `parse_objects`).
    FileNotFoundError if the file is missing.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"records file {path} is a directory; pass the JSONL/JSON/parquet file(s) in it")
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} does not exist")
    return parse_objects(path, _parse)


def parse_objects(path: Path, parse: Callable[[Any, str, int], T]) -> tuple[list[T], list[str]]:
    """`parse(obj, where, index)` of every record slot of `path` (see `raw_objects`), and the problems
    "where: why; record skipped" of the slots that are not valid JSON or whose parse raised ValueError, logged in one
    line when some slots are usable (when none is, the caller's error says why)."""
    items, problems = [], []
    for index, (where, obj, err) in enumerate(raw_objects(path)):
        if err is None:
            try:
                items.append(parse(obj, where, index))
                continue
            except ValueError as e:
                err = str(e).removeprefix(f"{where}: ")
        problems.append(f"{where}: {err}; record skipped")
    if problems and items:
        log.warning("%s", skipped(problems))
    return items, problems


def skipped(problems: Sequence[str], shown: int = 3) -> str:
    """The skipped records `problems` in one line, however many: the count, the first with its reason, where the
    next `shown` are."""
    first, rest = problems[0].removesuffix("; record skipped"), [p.split(": ", 1)[0] for p in problems[1:]]
    more = f" and {len(rest) - shown} more" if len(rest) > shown else ""
    return (f"{len(problems)} record{'s' * (len(problems) > 1)} skipped: {first}"
            + (f"; also {', '.join(rest[:shown])}{more}" if rest else ""))


# ---- tokenizing -----------------------------------------------------------------------------------------------
def record_texts(record: Record, tokenizer: Any = None, chat_template_kwargs: Mapping | None = None) -> tuple[str, str]:
    """(prompt text, response text). For messages: prompt = apply_chat_template(messages[:-1],
    add_generation_prompt=True, tokenize=False, **chat_template_kwargs), response = last message content --
    the same split as the paper's {"input", "output"} files (no end-of-turn token in the response)."""
    if record.fmt != "messages":
        return record.prompt, record.response
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError(f"{record.where}: messages records need a tokenizer with apply_chat_template")
    prompt = tokenizer.apply_chat_template(list(record.messages[:-1]), add_generation_prompt=True, tokenize=False,
                                           **dict(chat_template_kwargs or {}))
    return prompt, record.response


def tokenize_records(records: Sequence[Record], tokenizer: TextTokenizer, *, max_seq_len: int | None = None,
                     id_offset: int = 0, chat_template_kwargs: Mapping | None = None,
                     problems: list[str] | None = None) -> list[Sample]:
    """Tokenize prompt and response separately (`encode(text, add_special_tokens=False)`) and concatenate; a
    record's `input_token_ids` / `output_token_ids` (what `driftscope generate` writes: the ids the model saw and
    emitted, EOS included) are used as they are.

    Separately, so the response tokens are the response's own encoding and the prompt/response boundary is a
    token boundary. The paper tokenized `input + output` jointly: the same ids unless the tokenizer merges across
    the boundary (1 of the paper's 2937 lines, UniReason-RL_ifeval.jsonl:15, whose output starts with newlines).

    sample_id = id_offset + record.index (stable under bad records). max_seq_len keeps the first max_seq_len
    tokens (scored tokens keep their full left context; the response tail is dropped, `truncated=True`); a sample
    left with no scored token is reported in `problems` (and logged) and skipped.
    """
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    problems = problems if problems is not None else []
    out = []
    for rec in records:
        try:
            prompt, response = record_texts(rec, tokenizer, chat_template_kwargs)
        except ChatTemplateError:
            raise  # the template itself is broken: every record would fail alike
        except ValueError as e:
            problems.append(f"{rec.where}: {e}; record skipped")
            log.warning("%s", problems[-1])
            continue
        if rec.prompt_ids is not None:
            p_ids = list(rec.prompt_ids)
        else:
            p_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        if rec.response_ids is not None:
            r_ids = list(rec.response_ids)
            decode = getattr(tokenizer, "decode", None)
            if decode is not None and not decode(r_ids).startswith(response):
                problems.append(f"{rec.where}: output_token_ids do not decode to a text that starts with 'output' "
                                "(edited by hand? drop output_token_ids to score the text); record skipped")
                log.warning("%s", problems[-1])
                continue
        else:
            r_ids = tokenizer.encode(response, add_special_tokens=False)
        ids = list(p_ids) + list(r_ids)
        truncated = max_seq_len is not None and len(ids) > max_seq_len
        if truncated:
            ids = ids[:max_seq_len]
        sample = Sample(id_offset + rec.index, torch.tensor(ids, dtype=torch.int64), len(p_ids), rec.where, truncated)
        if sample.n_scored == 0:
            why = (f"prompt has {len(p_ids)} tokens, max_seq_len {max_seq_len} leaves no response token"
                   if truncated else f"no scorable response token ({len(r_ids)} response tokens, {len(p_ids)} prompt)")
            problems.append(f"{rec.where}: {why}; record skipped")
            log.warning("%s", problems[-1])
            continue
        out.append(sample)
    return out


def _overlong_error(items: Sequence[tuple[str, int]], what: str, fix: str) -> InputError:
    """The error for records that do not fit the context: the first few by place and length, and how many."""
    shown = ", ".join(f"{where} ({n} tokens)" for where, n in items[:3])
    more = f" and {len(items) - 3} more" if len(items) > 3 else ""
    return InputError(f"{len(items)} record{'s' if len(items) > 1 else ''} {what}: {shown}{more}; {fix}")


def fit_context(samples: list[Sample], context: int, source: str, overlong: str, problems: list[str]) -> list[Sample]:
    """`samples` that fit `context` tokens (the models' max_position_embeddings, in `source`). Longer ones: an
    InputError naming them (overlong="error"), or cut to their first `context` tokens ("truncate", logged once; one
    left with no scored token is skipped, in `problems`)."""
    over = [(s.where, len(s.input_ids)) for s in samples if len(s.input_ids) > context]
    if not over:
        return samples
    limit = f"the context of {context} tokens (max_position_embeddings of {source})"
    if overlong == "error":
        raise _overlong_error(over, f"longer than {limit}", f"pass --overlong truncate to score their first {context} "
                              "tokens, or cut them with --max-seq-len")
    log.warning("%d record(s) longer than %s: truncated to their first %d tokens (--overlong truncate)",
                len(over), limit, context)
    out = []
    for s in samples:
        if len(s.input_ids) > context:
            s = Sample(s.sample_id, s.input_ids[:context], s.n_prompt, s.where, truncated=True)
            if s.n_scored == 0:
                problems.append(f"{s.where}: the prompt fills {limit}, which leaves no response token; record skipped")
                log.warning("%s", problems[-1])
                continue
        out.append(s)
    return out


def fit_prompts(prompts: Sequence[tuple[str, int]], max_new_tokens: int, context: int, source: str, overlong: str,
                problems: list[str]) -> set[str]:
    """Prompts (where, prompt tokens) whose prompt + max_new_tokens exceed `context` (the models'
    max_position_embeddings, in `source`): an InputError naming them (overlong="error"); with "truncate" they stop
    generating at the context (logged once) and the places of those that fill the context alone come back, to skip
    (in `problems`)."""
    over = [(w, n + max_new_tokens) for w, n in prompts if n + max_new_tokens > context]
    if not over:
        return set()
    limit = f"the context of {context} tokens (max_position_embeddings of {source})"
    if overlong == "error":
        raise _overlong_error(over, f"whose prompt + max_new_tokens {max_new_tokens} exceeds {limit}",
                              "lower --max-new-tokens, or pass --overlong truncate to stop generating at the context")
    full = [w for w, n in prompts if n >= context]
    for w in full:
        problems.append(f"{w}: the prompt fills {limit} alone, which leaves no room to generate; record skipped")
        log.warning("%s", problems[-1])
    if len(over) > len(full):
        log.warning("%d prompt(s) + max_new_tokens %d exceed %s: their generation stops there (--overlong truncate)",
                    len(over) - len(full), max_new_tokens, limit)
    return set(full)


def load_samples(path: str | Path, tokenizer: TextTokenizer, **kwargs: Any) -> tuple[list[Sample], list[str]]:
    """read_records + tokenize_records; returns (samples, problems from both steps)."""
    records, problems = read_records(path)
    return tokenize_records(records, tokenizer, problems=problems, **kwargs), problems


# ---- packing --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class PackedBatch:
    """B whole samples concatenated into T tokens (varlen / flash-attn layout, no padding).

    input_ids [T] int64; cu_seqlens [B+1] int32; max_seqlen; score_mask [T] bool (positions predicting a
    response token); targets [T] int64 (next token where scored, −1 elsewhere); first_scored [T] bool (the
    first scored position of each sample); token_sample_ids [T] int64.
    """
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    score_mask: torch.Tensor
    targets: torch.Tensor
    first_scored: torch.Tensor
    token_sample_ids: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    # What the token accumulators take, for the N scored positions:
    @property
    def scored_targets(self) -> torch.Tensor:       # [N] the vocab_probe targets
        return self.targets[self.score_mask]

    @property
    def scored_sample_ids(self) -> torch.Tensor:    # [N] TokenMetrics.update(sample_ids=...)
        return self.token_sample_ids[self.score_mask]

    @property
    def scored_first(self) -> torch.Tensor:         # [N] TokenMetrics.update(first_response_token=...)
        return self.first_scored[self.score_mask]


def _build(samples: Sequence[Sample]) -> PackedBatch:
    lens = [len(s.input_ids) for s in samples]
    ids = torch.cat([s.input_ids for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    mask = torch.zeros(ids.shape[0], dtype=torch.bool)
    first = torch.zeros(ids.shape[0], dtype=torch.bool)
    targets = torch.full_like(ids, -1)
    for s, start in zip(samples, cu[:-1].tolist()):
        a, b = start + s.first_scored, start + len(s.input_ids) - 1  # scored: [a, b)
        mask[a:b] = True
        first[a] = True
        targets[a:b] = ids[a + 1:b + 1]
    sids = torch.tensor([s.sample_id for s in samples], dtype=torch.int64)
    return PackedBatch(ids, cu, max(lens), mask, targets, first, torch.repeat_interleave(sids, torch.tensor(lens)))


def next_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped in order, a new group whenever the next item would exceed `budget` tokens
    (an item longer than the budget gets a group of its own); zero-length items are left out."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return groups + ([cur] if cur else [])


def pack_batches(samples: Iterable[Sample], max_batch_tokens: int) -> list[PackedBatch]:
    """Pack whole samples, in sample-id order, into batches of at most `max_batch_tokens` tokens (next-fit).

    Deterministic and independent of the input order (the batches depend only on the set of samples). A sample
    longer than the budget gets a batch of its own (which then exceeds the budget); samples are never split,
    which the accumulators rely on. ValueError on duplicate sample ids.
    """
    if max_batch_tokens <= 0:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    ordered = sorted(samples, key=lambda s: s.sample_id)
    for s in ordered:
        if s.n_scored == 0:
            raise ValueError(f"sample {s.sample_id} ({s.where}) has no scored position "
                             f"(n_prompt {s.n_prompt}, {len(s.input_ids)} tokens)")
    for a, b in zip(ordered, ordered[1:]):
        if a.sample_id == b.sample_id:
            raise ValueError(f"duplicate sample_id {a.sample_id} ({a.where} and {b.where}); use id_offset per file")
    groups = next_fit([len(s.input_ids) for s in ordered], max_batch_tokens)
    return [_build([ordered[i] for i in g]) for g in groups]
