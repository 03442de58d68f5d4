"""Scheduler and block allocator on their own (no model): admission order and budgets, the spare-block rule,
preemption of the newest sequence, and no block lost or handed out twice."""
from __future__ import annotations

import pytest

from driftscope.engine.kv_cache import BlockAllocator
from driftscope.engine.sampling import SamplingParams
from driftscope.engine.scheduler import Scheduler, Seq


def _seq(sid: int, n: int) -> Seq:
    return Seq(sid, sid, 0, list(range(1, n + 1)), SamplingParams(max_new_tokens=100), checker=None)


def _step(sched: Scheduler) -> tuple[list[int], list[int]]:
    """Schedule, then pretend each scheduled sequence got one new token."""
    decode, prefill = sched.schedule()
    for s in decode + prefill:
        s.n_cached = len(s.tokens)
        s.tokens.append(0)
    return [s.sid for s in decode], [s.sid for s in prefill]


def _check_blocks(sched: Scheduler) -> None:
    held = [b for s in sched.running for b in s.block_table]
    assert len(held) == len(set(held)), "a block is held twice"
    assert len(held) + sched.alloc.num_free == sched.alloc.num_blocks, "a block was lost"
    for s in sched.running:
        assert len(s.block_table) * sched.alloc.block_size >= len(s.tokens) - 1


def test_admission_is_in_order_within_the_sequence_and_token_budgets():
    sched = Scheduler(BlockAllocator(100, 4), max_num_seqs=3, max_step_tokens=20)
    for sid, n in enumerate([8, 8, 3, 2, 2]):
        sched.add(_seq(sid, n))
    assert _step(sched) == ([], [0, 1, 2])  # 8 + 8 + 3 tokens; the 4th would exceed max_num_seqs
    assert _step(sched) == ([0, 1, 2], [])
    sched.finish(sched.running[1])
    assert _step(sched) == ([0, 2], [3])  # a freed slot is filled in the same step as the decodes
    _check_blocks(sched)


def test_a_prompt_longer_than_the_step_budget_runs_alone():
    sched = Scheduler(BlockAllocator(100, 4), max_num_seqs=8, max_step_tokens=10)
    sched.add(_seq(0, 25))
    sched.add(_seq(1, 3))
    assert _step(sched) == ([], [0])
    assert _step(sched) == ([0], [1])


def test_admission_keeps_a_spare_block_per_running_sequence():
    sched = Scheduler(BlockAllocator(6, 4), max_num_seqs=8, max_step_tokens=100)
    sched.add(_seq(0, 8))  # 2 blocks
    sched.add(_seq(1, 8))  # 2 blocks: 2 + 2 + 1 spare for seq 0 <= 6
    sched.add(_seq(2, 4))  # 1 block: 4 + 1 + 2 spares > 6: waits
    assert _step(sched) == ([], [0, 1])
    assert [s.sid for s in sched.waiting] == [2]
    _check_blocks(sched)


def test_a_full_cache_preempts_the_newest_and_recomputes_it_later():
    sched = Scheduler(BlockAllocator(4, 4), max_num_seqs=8, max_step_tokens=100)
    sched.add(_seq(0, 4))
    sched.add(_seq(1, 3))
    assert _step(sched) == ([], [0, 1])  # 1 + 1 blocks; 2 free
    assert _step(sched) == ([0, 1], [])  # seq 0 needs its 2nd block (5 tokens): 1 free left
    for _ in range(3):
        _step(sched)
    # seq 0 now has 8 tokens + 1, seq 1 7 + 1: both want a new block; only seq 0 gets one, seq 1 is preempted
    d, p = _step(sched)
    assert sched.stats.preemptions == 1 and 1 not in d and [s.sid for s in sched.waiting] == [1]
    seq1 = sched.waiting[0]
    assert seq1.block_table == [] and seq1.n_cached == 0 and len(seq1.tokens) == 3 + 5  # its tokens are kept
    _check_blocks(sched)
    sched.finish(sched.running[0])
    d, p = _step(sched)
    assert p == [1]  # recomputed: a prefill of prompt + generated tokens
    _check_blocks(sched)


def test_allocator_refuses_double_free():
    a = BlockAllocator(2, 4)
    ids = a.allocate(2)
    a.free(ids)
    with pytest.raises(AssertionError, match="freed twice"):
        a.free(ids[:1])
    with pytest.raises(ValueError, match="at least one block"):
        BlockAllocator(0, 4)
