"""Continuous batching: which sequences run in the next step, with what blocks, and who is preempted.

Every step, each running sequence decodes one token (oldest first); when the cache has no block for a sequence's
next token, the newest running sequences are preempted (their blocks freed, their tokens kept) and go back to the
front of the queue, to be recomputed by a prefill later. Then waiting sequences are admitted in order, as long as
the step's token budget and the free blocks allow (keeping one spare block per running sequence, so an admission
does not immediately force a preemption); their prefills run in the same step as the decodes.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from driftscope.engine.kv_cache import BlockAllocator
from driftscope.engine.sampling import SamplingParams
from driftscope.engine.stopping import StopChecker


class Seq:
    """One sequence being generated: prompt + generated tokens, its blocks, and how far the cache holds it."""

    __slots__ = ("sid", "prompt_index", "sample_index", "tokens", "n_prompt", "params", "block_table", "n_cached",
                 "checker", "finish_reason", "stop_reason")

    def __init__(self, sid: int, prompt_index: int, sample_index: int, prompt_ids: list[int], params: SamplingParams,
                 checker: StopChecker):
        self.sid, self.prompt_index, self.sample_index = sid, prompt_index, sample_index
        self.tokens = list(prompt_ids)
        self.n_prompt = len(prompt_ids)
        self.params = params
        self.block_table: list[int] = []
        self.n_cached = 0  # tokens whose keys/values are in the cache
        self.checker = checker
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.n_prompt:]


@dataclass
class SchedulerStats:
    steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    preemptions: int = 0
    admitted_while_decoding: int = 0  # sequences whose prefill ran in a step with decodes of others
    max_running: int = 0
    trace: list[tuple[list[int], list[int]]] = field(default_factory=list)  # per step (decode sids, prefill sids)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_step_tokens: int, trace: bool = False):
        self.alloc = allocator
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # admission order, oldest first
        self.stats = SchedulerStats()
        self._trace = trace

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Seq], list[Seq]]:
        """(decode sequences, prefill sequences) of the next step; blocks for all their new tokens are allocated."""
        alloc = self.alloc
        queue = list(self.running)
        decode: list[Seq] = []
        while queue:
            seq = queue.pop(0)
            need = alloc.blocks_for(len(seq.tokens)) - len(seq.block_table)
            while need > alloc.num_free and queue:
                self._preempt(queue.pop())  # the newest running sequence
            if need > alloc.num_free:  # seq is the newest left; the older ones hold the cache
                assert decode, "a lone sequence must fit the cache (checked when requests are added)"
                self._preempt(seq)
                break
            seq.block_table += alloc.allocate(need)
            decode.append(seq)
        self.running = list(decode)
        budget = self.max_step_tokens - len(decode)
        prefill: list[Seq] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = len(seq.tokens)
            if n > budget and (decode or prefill):
                break
            need = alloc.blocks_for(n)
            if need + len(self.running) > alloc.num_free and self.running:
                break
            self.waiting.popleft()
            seq.block_table = alloc.allocate(need)
            prefill.append(seq)
            self.running.append(seq)
            budget -= n
        assert decode or prefill, "scheduler made no progress"
        st = self.stats
        st.steps += 1
        st.decode_tokens += len(decode)
        st.prefill_tokens += sum(len(s.tokens) for s in prefill)
        st.admitted_while_decoding += len(prefill) if decode else 0
        st.max_running = max(st.max_running, len(self.running))
        if self._trace:
            st.trace.append(([s.sid for s in decode], [s.sid for s in prefill]))
        return decode, prefill

    def _preempt(self, seq: Seq) -> None:
        self.alloc.free(seq.block_table)
        seq.block_table, seq.n_cached = [], 0
        self.running = [s for s in self.running if s is not seq]
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def finish(self, seq: Seq) -> None:
        self.alloc.free(seq.block_table)
        seq.block_table = []
        self.running = [s for s in self.running if s is not seq]
