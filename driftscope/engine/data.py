"""Records -> tokenized `Sample`s -> token-budget `PackedBatch`es (cu_seqlens, no padding) for a drift run.

Reading files is `driftscope.records`' job; this module takes its `Record`s. Records that cannot be scored are
skipped but never silently: each is reported as "where: why; record skipped" in `problems`, and logged.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from driftscope.engine.tokenizer import ChatTemplateError
from driftscope.errors import InputError

if TYPE_CHECKING:
    from driftscope.records import Record

__all__ = ["Sample", "PackedBatch", "record_texts", "tokenize_records", "pack_batches", "next_fit", "OVERLONG",
           "fit_context", "fit_prompts", "share_prefix"]

log = logging.getLogger(__name__)
OVERLONG = ("error", "truncate")  # what to do with records longer than the models' context


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


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


# ---- packing --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class PackedBatch:
    """B whole samples concatenated into T tokens (varlen / flash-attn layout, no padding).

    input_ids [T] int64; cu_seqlens [B+1] int32; max_seqlen; score_mask [T] bool (positions predicting a
    response token); targets [T] int64 (next token where scored, −1 elsewhere); first_scored [T] bool (the
    first scored position of each sample); token_sample_ids [T] int64.
    `prefix` > 0 (`share_prefix`): sequence 0 of cu_seqlens is a token prefix the B − 1 samples after it share
    and continue (their rows hold only what follows it, at positions prefix...; no row of the prefix is scored).
    """
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    score_mask: torch.Tensor
    targets: torch.Tensor
    first_scored: torch.Tensor
    token_sample_ids: torch.Tensor
    prefix: int = 0

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


def share_prefix(batch: PackedBatch, min_share: float = 1 / 32) -> PackedBatch:
    """The batch with its samples' longest common token prefix stored once (`PackedBatch.prefix`), when that saves
    at least `min_share` of its rows; else the batch itself. The prefix stops before every sample's first scored
    position, so it holds context only; the scored rows keep their order (scored_* are unchanged)."""
    bounds = batch.cu_seqlens.tolist()
    spans = list(zip(bounds[:-1], bounds[1:]))
    if batch.prefix or len(spans) < 2:
        return batch
    firsts = batch.first_scored.nonzero().squeeze(1).tolist()  # one per sample, in order
    limit = min(f - s for f, (s, _) in zip(firsts, spans))  # the prefix holds no scored row
    (s0, _), ids = spans[0], batch.input_ids
    p = limit
    for s, _ in spans[1:]:
        if p == 0:
            break
        same = (ids[s:s + p] == ids[s0:s0 + p]).logical_not().nonzero()
        p = int(same[0]) if same.numel() else p
    if p == 0 or (len(spans) - 1) * p < min_share * batch.n_tokens:
        return batch
    keep = torch.ones(batch.n_tokens, dtype=torch.bool)
    for s, _ in spans:
        keep[s:s + p] = False
    keep[s0:s0 + p] = True  # sample 0's prefix rows are the shared prefix
    lens = [p] + [e - s - p for s, e in spans]
    cu = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(torch.int32)
    sids = batch.token_sample_ids[keep]
    sids[:p] = -1  # the prefix belongs to every sample
    return PackedBatch(ids[keep], cu, batch.max_seqlen, batch.score_mask[keep], batch.targets[keep],
                       batch.first_scored[keep], sids, p)


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
