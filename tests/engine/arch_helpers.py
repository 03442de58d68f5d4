"""Helpers for the architecture-feature parity tests: a tiny random transformers checkpoint per config, its float64
reference (fresh rope state per call: transformers' dynamic rope keeps the frequencies of the longest sequence it has
seen), packed forwards, and step logits of our generation engine next to transformers' cached generate."""
from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from engine_helpers import assert_close, randomize_

from driftscope.engine.decoding import GenerationEngine, GenRequest
from driftscope.engine.loader import load_model
from driftscope.engine.sampling import SamplingParams

TINY = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6)
TOL = 1e-4  # max|Δ| / max|ref| of our float32 against transformers' float64; measured ~1e-6
TIE_TOL = 2e-5  # a greedy difference is accepted only where the float64 top two are this close (relative)


def build(root: Path, model_type: str, kwargs: dict):
    """(float64 transformers reference, our float32 model) of one random checkpoint saved under root."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **kwargs})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    randomize_(hf)
    hf.save_pretrained(root, safe_serialization=True)
    return copy.deepcopy(hf).double().eval(), load_model(root)


def fresh_rope(hf) -> None:
    """Reset transformers' dynamic-rope state, so a call sees what a freshly loaded model would."""
    r = hf.model.rotary_emb
    if hasattr(r, "original_inv_freq"):
        r.inv_freq = r.original_inv_freq.clone()
        r.max_seq_len_cached = r.original_max_seq_len


@torch.no_grad()
def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:  # [L] -> [L, V] float64
    fresh_rope(hf)
    return hf(ids[None]).logits[0]


def random_seqs(vocab: int, lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@torch.no_grad()
def assert_packed_matches(hf, model, lengths: list[int], what: str, seed: int = 1) -> None:
    """Our logits over one packed batch of `lengths` equal transformers' for each sequence run alone."""
    seqs = random_seqs(model.config.vocab_size, lengths, seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    logits = F.linear(model.forward(torch.cat(seqs), cu).hidden, model.lm_head_weight)  # [T, V]
    for b, seq in enumerate(seqs):
        ours = logits[int(cu[b]):int(cu[b + 1])]
        assert_close(ours, hf_logits(hf, seq), TOL, f"{what} sequence {b} (len {len(seq)})")


def engine_step_logits(model, prompts: list[list[int]], max_new: int, **engine_kw):
    """Greedy generations of our engine, and per prompt the float64 logits of every step that sampled a token."""
    steps: dict[int, list[torch.Tensor]] = defaultdict(list)

    def on_step(out):
        z = F.linear(out.hidden[0], model.lm_head_weight).double()  # [B, V]
        for seq, row in zip(out.seqs, z):
            steps[seq.prompt_index].append(row)

    engine = GenerationEngine(model, eos_token_ids=(), **engine_kw)
    reqs = [GenRequest(p, SamplingParams(max_new_tokens=max_new), i) for i, p in enumerate(prompts)]
    gens = sorted(engine.run(reqs, on_step=on_step), key=lambda g: g.index)
    assert engine.stats.preemptions == 0, "a recomputed prefill is not what transformers' generate does"
    return gens, steps


@torch.no_grad()
def assert_decode_matches(hf, model, prompts: list[list[int]], max_new: int, what: str, **engine_kw) -> int:
    """Each step's logits of our paged-cache generation equal transformers' cached greedy generate, up to the first
    token where the two part at a true near-tie (returns how many prompts parted)."""
    gens, steps = engine_step_logits(model, prompts, max_new, **engine_kw)
    parted = 0
    for g, p in zip(gens, prompts):
        fresh_rope(hf)
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
        ref_tokens, ref_logits = out.sequences[0, len(p):].tolist(), [z[0] for z in out.logits]
        assert len(steps[g.index]) == max_new, f"{what}: {len(steps[g.index])} steps for prompt {g.index}"
        for t, (ours, ref) in enumerate(zip(steps[g.index], ref_logits)):
            assert_close(ours, ref, TOL, f"{what} prompt {g.index} (len {len(p)}) step {t} (position {len(p) + t})")
            a, b = g.token_ids[t], ref_tokens[t]
            if a != b:
                gap = abs(float(ref[a] - ref[b]))
                assert gap <= TIE_TOL * float(ref.abs().max()), f"{what}: token {t} {a} vs {b}, gap {gap:.3e}"
                parted += 1
                break
    return parted
