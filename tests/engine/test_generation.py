"""Generation on the engine: greedy parity with transformers, batch independence, continuous batching, preemption,
seeded sampling, finish reasons. Tiny random checkpoints of every architecture, float32 on the CPU."""
from __future__ import annotations

import pytest
import torch

from driftscope.engine.kv_cache import bytes_per_block
from driftscope.engine.loader import load_model
from driftscope.engine.sampling import SamplingParams
from engine_helpers import CASE_IDS, CASES
from gen_helpers import TieOracle, assert_same_greedy, prompts, run

MAX_NEW = 24


@pytest.fixture(scope="module")
def oracles():
    return {}


def _oracle(oracles, checkpoints, case) -> TieOracle:
    if case.id not in oracles:
        oracles[case.id] = TieOracle(checkpoints.hf_model(case))
    return oracles[case.id]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_greedy_matches_transformers_generate(checkpoints, oracles, case):
    hf = checkpoints.hf_model(case)
    model = load_model(checkpoints.path(case))
    ps = prompts(hf.config.vocab_size)
    outs, engine = run(model, ps, SamplingParams(max_new_tokens=MAX_NEW), max_num_seqs=4)
    oracle = _oracle(oracles, checkpoints, case)
    for g, p in zip(outs, ps):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert len(g.token_ids) == MAX_NEW and g.finish_reason == "length"
        assert_same_greedy(g.token_ids, ref, p, oracle, f"{case.id} prompt {g.index} (len {len(p)})")
    assert len(oracle.ties) <= 1, f"more near-ties than float32 rounding explains: {oracle.ties}"
    assert engine.stats.steps > MAX_NEW  # 6 prompts with at most 4 at a time: a second wave was admitted


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=[CASES[i].id for i in (1, 3, 5)])
def test_greedy_output_does_not_depend_on_the_batch(checkpoints, oracles, case):
    model = load_model(checkpoints.path(case))
    ps = prompts(model.config.vocab_size, seed=1)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    alone = [run(model, [p], params)[0][0].token_ids for p in ps]
    oracle = _oracle(oracles, checkpoints, case)
    layouts = {
        "all together": (list(range(len(ps))), {}),
        "reversed": (list(reversed(range(len(ps)))), {}),
        "two at a time": (list(range(len(ps))), {"max_num_seqs": 2}),
        "small steps": (list(range(len(ps))), {"max_step_tokens": 8}),
    }
    for name, (order, kw) in layouts.items():
        outs, _ = run(model, [ps[i] for i in order], params, **kw)
        for g in outs:
            i = order[g.index]
            assert_same_greedy(g.token_ids, alone[i], ps[i], oracle, f"{case.id} {name}, prompt {i}")


def test_sequences_are_admitted_while_others_decode(checkpoints, oracles):
    case = CASES[5]
    model = load_model(checkpoints.path(case))
    ps = prompts(model.config.vocab_size, seed=2)
    lengths = [3, 30, 5, 12, 8, 20]  # mixed output lengths: short ones finish and free their slots early
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    outs, engine = run(model, ps, params, max_num_seqs=2, trace=True)
    st = engine.stats
    mixed = [i for i, (dec, pre) in enumerate(st.trace) if dec and pre]
    assert st.admitted_while_decoding >= 3 and mixed, f"no step packed a prefill with decodes: {st.trace}"
    assert st.max_running == 2
    assert st.decode_tokens + len(ps) == sum(lengths)  # finished sequences stop costing compute
    oracle = _oracle(oracles, checkpoints, case)
    for g, p, q in zip(outs, ps, params):
        assert len(g.token_ids) == q.max_new_tokens
        solo = run(model, [p], q)[0][0].token_ids
        assert_same_greedy(g.token_ids, solo, p, oracle, f"prompt {g.index}")


def test_preemption_under_a_small_cache_gives_the_unlimited_outputs(checkpoints, oracles):
    case = CASES[3]
    model = load_model(checkpoints.path(case))
    ps = prompts(model.config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=16)
    unlimited, _ = run(model, ps, params, block_size=4)
    blocks = 12  # 48 token slots; the longest sequence needs 36, all six together 138
    outs, engine = run(model, ps, params, block_size=4, cache_memory=blocks * bytes_per_block(model, 4))
    assert engine.cache_tokens == 48
    assert engine.stats.preemptions > 0, engine.stats
    oracle = _oracle(oracles, checkpoints, case)
    for g, u, p in zip(outs, unlimited, ps):
        assert_same_greedy(g.token_ids, u.token_ids, p, oracle, f"preempted run, prompt {g.index}")


def test_a_cache_too_small_for_one_sequence_is_refused(checkpoints):
    model = load_model(checkpoints.path(CASES[0]))
    with pytest.raises(ValueError, match=r"one request needs 44 tokens; raise cache_memory"):
        run(model, [[1] * 20], SamplingParams(max_new_tokens=24), block_size=4,
            cache_memory=5 * bytes_per_block(model, 4))


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(checkpoints):
    model = load_model(checkpoints.path(CASES[5]))
    ps = prompts(model.config.vocab_size, seed=4)
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50, n=3, seed=7)
    from driftscope.engine.decoding import GenerationEngine, GenRequest

    def go(order, **kw):
        engine = GenerationEngine(model, eos_token_ids=(), **kw)
        reqs = [GenRequest(ps[i], params, i, s) for i in order for s in range(params.n)]
        return {(g.index, g.sample): g.token_ids for g in engine.run(reqs)}

    a = go(range(len(ps)))
    assert a == go(reversed(range(len(ps))), max_num_seqs=3)
    for i in range(len(ps)):  # each prompt alone: the same draws
        solo = go([i])
        assert all(solo[(i, s)] == a[(i, s)] for s in range(params.n))
    assert len({tuple(a[(0, s)]) for s in range(params.n)}) == params.n, "the n samples of a prompt must differ"
    other = GenerationEngine(model, eos_token_ids=()).run([GenRequest(ps[0], SamplingParams(
        max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50, n=3, seed=8), 0, 0)])
    assert next(other).token_ids != a[(0, 0)], "another seed must give other draws"


def test_finish_reasons_eos_length_and_context(checkpoints):
    case = CASES[2]  # max_position_embeddings = 256
    model = load_model(checkpoints.path(case))
    (p,) = prompts(model.config.vocab_size, lengths=[6], seed=5)
    free = run(model, [p], SamplingParams(max_new_tokens=12))[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12 and free.stop_reason is None
    eos = free.token_ids[5]
    first = free.token_ids.index(eos)
    stopped = run(model, [p], SamplingParams(max_new_tokens=12), eos_token_ids=(eos,))[0][0]
    assert stopped.finish_reason == "eos" and stopped.stop_reason == eos
    assert stopped.token_ids == free.token_ids[:first + 1]  # the EOS itself is the last generated id
    ignored = run(model, [p], SamplingParams(max_new_tokens=12, ignore_eos=True), eos_token_ids=(eos,))[0][0]
    assert ignored.token_ids == free.token_ids
    by_id = run(model, [p], SamplingParams(max_new_tokens=12, stop_token_ids=(eos,)))[0][0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == stopped.token_ids
    long = [1] * 250
    ctx = run(model, [long], SamplingParams(max_new_tokens=20))[0][0]
    assert ctx.finish_reason == "context" and len(long) + len(ctx.token_ids) == 256


def test_no_unwritten_cache_slot_is_ever_read(checkpoints, monkeypatch):
    """A NaN-filled cache gives the same tokens: padded decode keys, freed and reused blocks hold only written data."""
    from driftscope.engine.kv_cache import KVCache

    model = load_model(checkpoints.path(CASES[1]))
    ps = prompts(model.config.vocab_size, seed=6)
    params = [SamplingParams(max_new_tokens=n) for n in (4, 20, 9, 14, 6, 11)]
    clean, _ = run(model, ps, params, max_num_seqs=3, block_size=4)
    monkeypatch.setattr(KVCache, "debug_fill", float("nan"))
    dirty, _ = run(model, ps, params, max_num_seqs=3, block_size=4)
    assert [g.token_ids for g in dirty] == [g.token_ids for g in clean]
