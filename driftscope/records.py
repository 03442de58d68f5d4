"""Records files in, records out: the one place driftscope reads records and prompt files (the engine never reads a
file). JSONL, a JSON list, or parquet (with pyarrow); each record's format is detected on its own:

- drift records (`read_records`): `{"input", "output"}` (the paper's response files), `{"prompt", "response"}`,
  `{"messages": [...]}` (chat; the last message is the response) or `{"text"}`, optionally with the token ids
  `driftscope generate` writes (`input_token_ids`, `output_token_ids`);
- prompts (`read_prompts`): a prompt from `field`, or else from the first of `messages`, `input` (an already rendered
  prompt, never templated again), `prompt`, `question`, `problem`, `text`; a trailing assistant message (a drift
  records file) is dropped.

Bad records are skipped but never silently: each is a problem "file:line: why; record skipped", and a file's
problems are logged in one line (`skipped`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from driftscope.engine.data import Sample, TextTokenizer, tokenize_records
from driftscope.engine.prompts import prompt_kind
from driftscope.errors import InputError

__all__ = ["FORMATS", "Record", "PromptRecord", "PROMPT_FIELDS", "detect_format", "read_records", "read_prompts",
           "parse_objects", "skipped", "load_samples"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Auto-detection order: the first field set a record has wins.
FORMATS: dict[str, tuple[str, ...]] = {
    "input_output": ("input", "output"),      # the paper's response files: chat-templated prompt + continuation
    "prompt_response": ("prompt", "response"),
    "messages": ("messages",),                # chat; the last message must be the assistant's response
    "text": ("text",),                        # everything scored (except the first token, which has no context)
}


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


PROMPT_FIELDS = ("messages", "input", "prompt", "question", "problem", "text")
RENDERED_FIELDS = ("input",)  # already chat-templated text: used verbatim


@dataclass(frozen=True)
class PromptRecord:
    where: str  # "path:line" or "path[i]"
    index: int  # ordinal of the record slot in its file (bad records included)
    prompt: Any  # str | list[int] | list[dict]
    rendered: bool  # True when the text is already a full rendered prompt (the `input` field)


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
    prompt, response = ("", obj["text"]) if fmt == "text" else (obj[keys[0]], obj[keys[1]])
    prompt_ids, response_ids = _ids_field(obj, "input_token_ids"), _ids_field(obj, "output_token_ids")
    if not response and not response_ids:
        raise ValueError(f"field {keys[-1]!r} is empty: nothing to score")
    if fmt == "input_output" and not prompt and not prompt_ids:
        raise ValueError("field 'input' is empty (the paper's script skips such records too)")
    return Record(fmt, prompt, response, None, where, index, prompt_ids, response_ids)


def _ids_field(obj: Mapping, name: str) -> tuple[int, ...] | None:
    """An optional list of token ids (what `driftscope generate` writes beside the text)."""
    if (v := obj.get(name)) is None:
        return None
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
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the first record
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


def load_samples(path: str | Path, tokenizer: TextTokenizer, **kwargs: Any) -> tuple[list[Sample], list[str]]:
    """read_records + tokenize_records; returns (samples, problems from both steps)."""
    records, problems = read_records(path)
    return tokenize_records(records, tokenizer, problems=problems, **kwargs), problems


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
