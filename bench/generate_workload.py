"""The generation benchmark's workload, shared by the timed runs and the fresh-process memory runs.

16 prompts of mixed lengths (32-256 tokens) with mixed output lengths (16-128 new tokens), greedy, EOS ignored so
every implementation produces exactly the same number of tokens: Σ OUT_LENS = 1,072 useful tokens.
"""
from __future__ import annotations

import torch

PROMPT_LENS = [32, 240, 64, 128, 48, 200, 96, 160, 256, 40, 112, 72, 184, 56, 144, 88]
OUT_LENS = [128, 16, 96, 32, 112, 24, 64, 48, 16, 128, 80, 40, 24, 104, 56, 104]
USEFUL_TOKENS = sum(OUT_LENS)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def driftscope_run(model):
    """A callable that generates the workload on the driftscope engine (one continuous-batching run)."""
    from driftscope.engine.decoding import GenerationEngine, GenRequest
    from driftscope.engine.sampling import SamplingParams

    ps = prompts(model.config.vocab_size)
    engine = GenerationEngine(model, eos_token_ids=(), max_num_seqs=16)
    reqs = [GenRequest(p, SamplingParams(max_new_tokens=n, ignore_eos=True), i)
            for i, (p, n) in enumerate(zip(ps, OUT_LENS))]
    return lambda: list(engine.run(reqs))


def transformers_batched_run(hf):
    """One left-padded batch of 16 through `generate`: every row runs to the longest output (min = max)."""
    ps = prompts(hf.config.vocab_size)
    width = max(len(p) for p in ps)
    ids = torch.zeros(len(ps), width, dtype=torch.long)
    mask = torch.zeros(len(ps), width, dtype=torch.long)
    for i, p in enumerate(ps):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    n = max(OUT_LENS)

    def run():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
    return run


def transformers_sequential_run(hf):
    """Each prompt alone through `generate` with its own output length (no padding, no wasted rows)."""
    ps = prompts(hf.config.vocab_size)

    def run():
        with torch.inference_mode():
            return [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
                    for p, n in zip(ps, OUT_LENS)]
    return run
