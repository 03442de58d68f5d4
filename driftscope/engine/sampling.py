"""Sampling: greedy, temperature, top-k, top-p, with a counter-based random stream per sequence.

`sample(logits [B, V], temperature, top_k, top_p, uniforms) -> [B]`; `sampling_probs_torch` is the float64 reference
distribution it draws from. The uniform of step t of sample s of prompt i is a hash of (seed, i, s, t): a sequence's
draws do not depend on which other sequences share its batch, in what order, or whether it was preempted and
recomputed (the stream is addressed by position, not consumed).

Filtering order (as transformers and vLLM): divide by the temperature, keep the top_k largest logits (ties at the
k-th value kept), then the smallest set of most probable tokens whose probability sums to at least top_p (the token
that crosses top_p included, at least one token always kept). Then one inverse-CDF draw over the kept tokens sorted
by probability (ties by lower id). Greedy (temperature 0) is the argmax, lowest id on ties.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from driftscope.cli_options import cli
from driftscope.options import SeedOptions

_M64 = (1 << 64) - 1


@dataclass
class Decoding(SeedOptions):
    """The decoding options a user gives (the `driftscope drift --generate` and `generate` flags)."""

    max_new_tokens: int = field(default=512, metadata=cli("tokens to generate at most", group="decoding", ge=1))
    temperature: float = field(default=0.0, metadata=cli("0 = greedy", group="decoding", ge=0))
    top_p: float = field(default=1.0, metadata=cli("nucleus sampling mass in (0, 1]", group="decoding", gt=0, le=1))
    top_k: int = field(default=0, metadata=cli("keep the k most likely tokens; 0 = off", group="decoding", ge=0))
    stop: tuple[str, ...] = field(default=(), metadata=cli(  # caught across token boundaries
        "stop string (repeatable); trimmed from the output", group="decoding"))
    ignore_eos: bool = field(default=False, metadata=cli(  # benchmarks with fixed output lengths
        "do not stop at EOS (fixed-length benchmarks)", group="decoding"))


@dataclass
class SamplingParams(Decoding):
    """How to decode one request; validated here so a bad value is refused before any work, naming the value."""

    n: int = field(default=1, metadata=cli("samples per prompt", flag="-n", ge=1))
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end a sequence (besides the model's EOS ids)
    extra: dict = field(default_factory=dict, compare=False)  # free-form, carried along (e.g. lm-eval's request)

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "max_new_tokens",
                 self.max_new_tokens, "a positive integer")
        _require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
                 "a finite number >= 0 (0 = greedy)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _require(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _require(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _require(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        for s in self.stop:
            _require(isinstance(s, str) and s != "", "stop", self.stop, "non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _require(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


# ---- the random stream ----------------------------------------------------------------------------------------
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_uniform(seed: int, prompt: int, sample: int, step: int) -> float:
    """U[0, 1) for draw `step` of sample `sample` of prompt `prompt` under `seed` (53 random bits)."""
    h = _splitmix64(seed & _M64)
    for key in (prompt, sample, step):
        h = _splitmix64(h ^ (key & _M64))
    return (h >> 11) * 2.0**-53


# ---- sampling -------------------------------------------------------------------------------------------------
def _filtered_sorted(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """(probs [B, V] over the sorted order, zero where filtered; ids [B, V] the sorted token ids)."""
    z = logits.float() / temperature[:, None]  # [B, V]
    vals, ids = torch.sort(z, dim=-1, descending=True, stable=True)  # ties keep the lower id first
    V = z.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))  # [B]
    kth = vals.gather(1, (k - 1)[:, None])  # [B, 1] the k-th largest value
    vals = vals.masked_fill(vals < kth, float("-inf"))  # ties with the k-th value stay
    probs = torch.softmax(vals, dim=-1)  # [B, V]
    before = torch.cumsum(probs, dim=-1) - probs  # exclusive prefix sums
    # keep until the running sum reaches top_p; the most probable token always stays (its prefix sum is 0 < top_p)
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs, ids


def sample(
    logits: torch.Tensor,  # [B, V] float
    temperature: torch.Tensor,  # [B] float32, 0 = greedy
    top_k: torch.Tensor,  # [B] int64, 0 = off
    top_p: torch.Tensor,  # [B] float32 in (0, 1]
    uniforms: torch.Tensor,  # [B] float64 in [0, 1)
) -> torch.Tensor:  # [B] int64 token ids
    """One token per row (see the module docstring for the rule)."""
    assert logits.dim() == 2 and temperature.shape == top_k.shape == top_p.shape == uniforms.shape == logits.shape[:1]
    out = torch.argmax(logits, dim=-1)  # first maximum: lowest id on ties
    rows = (temperature > 0).nonzero().flatten()
    if rows.numel() == 0:
        return out
    probs, ids = _filtered_sorted(logits[rows], temperature[rows], top_k[rows], top_p[rows])
    cdf = torch.cumsum(probs.double(), dim=-1)  # [b, V]
    target = (uniforms[rows].to(cdf.device) * cdf[:, -1])[:, None]  # scaled to the kept mass
    j = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[1] - 1)  # first index with cdf > u·total
    # a zero-probability slot can never be chosen: cdf is flat there, so `right=True` lands past it
    out[rows] = ids.gather(1, j).flatten()
    return out


def sampling_probs_torch(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:  # [V] float64
    """Reference: the distribution `sample` draws from for one row of logits [V], step by step in float64."""
    z = logits.double()
    V = z.shape[0]
    if temperature == 0:
        p = torch.zeros(V, dtype=torch.float64)
        p[int(torch.argmax(z))] = 1.0
        return p
    z = z / temperature
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < top_k < V:
        kth = torch.sort(z, descending=True).values[top_k - 1]
        keep &= z >= kth
    p = torch.where(keep, torch.exp(z - z[keep].max()), torch.zeros_like(z))
    p /= p.sum()
    order = sorted(range(V), key=lambda i: (-float(p[i]), i))  # most probable first, lower id on ties
    kept, total = [], 0.0
    for i in order:
        if p[i] == 0 or (kept and total >= top_p):
            break
        kept.append(i)
        total += float(p[i])
    q = torch.zeros(V, dtype=torch.float64)
    q[kept] = p[kept]
    return q / q.sum()


def uniforms_for(keys: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
    """[B] float64 uniforms for (seed, prompt, sample, step) keys."""
    return torch.tensor([stream_uniform(*k) for k in keys], dtype=torch.float64)
