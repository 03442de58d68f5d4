"""Generation test helpers: prompts, running the engine, and comparing greedy outputs with near-ties identified.

Two greedy decoders that compute the same logits in a different order (batch composition, KV cache vs full
recompute, transformers vs ours) may pick different tokens only where the top two logits tie to within float32
rounding. `assert_same_greedy` walks both outputs; at the first difference it asks a float64 copy of the
transformers model for the logits there and accepts the difference only if the two chosen tokens are within
TIE_TOL of each other (a true near-tie); the rest of the sequence cannot be compared after that point.
"""
from __future__ import annotations

import copy

import torch

from driftscope.engine.decoding import GenerationEngine, GenRequest
from driftscope.engine.sampling import SamplingParams

TIE_TOL = 2e-5  # relative to max|logit|: float32 logits here differ by ~1e-6 relative between orderings
LENGTHS = [1, 7, 13, 4, 20, 9]  # mixed prompt lengths, including a one-token prompt


def prompts(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(model, ps: list[list[int]], params: SamplingParams | list[SamplingParams], **engine_kw):
    """Generations sorted by prompt index, and the engine (for its stats)."""
    engine_kw.setdefault("eos_token_ids", ())
    trace = engine_kw.pop("trace", False)
    engine = GenerationEngine(model, **engine_kw)
    engine.trace = trace
    plist = params if isinstance(params, list) else [params] * len(ps)
    outs = list(engine.run([GenRequest(p, q, i) for i, (p, q) in enumerate(zip(ps, plist))]))
    return sorted(outs, key=lambda g: (g.index, g.sample)), engine


class TieOracle:
    """float64 logits of a transformers model, to tell a near-tie from a bug."""

    def __init__(self, hf_model):
        self.hf = copy.deepcopy(hf_model).double().eval()
        self.ties: list[tuple] = []

    @torch.no_grad()
    def gap(self, prefix: list[int], a: int, b: int) -> tuple[float, float]:
        z = self.hf(torch.tensor([prefix])).logits[0, -1]
        return abs(float(z[a] - z[b])), float(z.abs().max())


def assert_same_greedy(ours: list[int], ref: list[int], prompt: list[int], oracle: TieOracle, what: str) -> bool:
    """True when equal; False when they part at a true near-tie (recorded in oracle.ties); AssertionError otherwise."""
    if ours == ref:
        return True
    t = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    if t is None:
        raise AssertionError(f"{what}: lengths differ ({len(ours)} vs {len(ref)}) with a common prefix")
    gap, scale = oracle.gap(prompt + ref[:t], ours[t], ref[t])
    if gap > TIE_TOL * max(scale, 1.0):
        raise AssertionError(
            f"{what}: token {t} differs ({ours[t]} vs reference {ref[t]}) and it is no near-tie: float64 logits "
            f"differ by {gap:.3e} (tolerance {TIE_TOL * max(scale, 1.0):.1e}); "
            f"ours {ours[:t + 3]}..., reference {ref[:t + 3]}..."
        )
    oracle.ties.append((what, t, gap))
    return False
