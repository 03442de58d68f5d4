"""Sampling: the sampler draws from the reference filtered distribution (chi-square on a small vocabulary), the
reference obeys the definitions, greedy ties, the counter-based random stream, and parameter validation."""
from __future__ import annotations

import math

import pytest
import torch

from driftscope.engine.sampling import SamplingParams, sample, sampling_probs_torch, stream_uniform, uniforms_for

stats = pytest.importorskip("scipy.stats", reason="scipy (with scikit-learn, test extra) for the chi-square test")

V = 16
DRAWS = 20000
# (temperature, top_k, top_p); ids read as T{t}-k{k}-p{p}
SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 4, 0.6), (0.5, 0, 0.3), (2.0, 3, 0.95)]


def _logits() -> torch.Tensor:  # [V] with a tie between ids 3 and 9 at the top and a long tail
    z = torch.linspace(-3.0, 2.0, V)[torch.randperm(V, generator=torch.Generator().manual_seed(0))]
    z[3] = z[9] = 2.5
    return z


def _draw(z: torch.Tensor, t: float, k: int, p: float, seed: int = 0) -> torch.Tensor:
    rows = z[None].expand(DRAWS, V).contiguous()
    u = uniforms_for([(seed, 0, 0, step) for step in range(DRAWS)])
    full = lambda v, dt: torch.full((DRAWS,), v, dtype=dt)  # noqa: E731
    return sample(rows, full(t, torch.float32), full(k, torch.int64), full(p, torch.float32), u)


@pytest.mark.parametrize("t,k,p", SETTINGS, ids=[f"T{t}-k{k}-p{p}" for t, k, p in SETTINGS])
def test_sampler_draws_from_the_reference_distribution(t, k, p):
    z = _logits()
    ref = sampling_probs_torch(z, t, k, p)
    counts = torch.bincount(_draw(z, t, k, p), minlength=V).double()
    support = ref > 0
    assert counts[~support].sum() == 0, (
        f"drew filtered-out tokens {torch.nonzero(counts * ~support).flatten().tolist()}")
    if int(support.sum()) == 1:  # a single kept token (top_p below the top probability): every draw is it
        assert counts[support].item() == DRAWS
        return
    chi2, pvalue = stats.chisquare(counts[support].numpy(), (ref[support] * DRAWS).numpy())
    assert pvalue > 1e-4, (f"chi2={chi2:.1f}, p={pvalue:.2e}; counts {counts[support].tolist()} "
                           f"vs expected {(ref[support] * DRAWS).tolist()}")


def test_reference_distribution_follows_the_definitions():
    z = _logits().double()
    assert torch.allclose(sampling_probs_torch(z, 0.8), torch.softmax(z / 0.8, 0), atol=1e-12)  # no filter
    top1 = sampling_probs_torch(z, 1.0, top_k=1)
    assert top1[3] > 0 and top1[9] > 0 and top1.sum() == pytest.approx(1.0)  # ties at the k-th value are kept
    assert torch.equal(sampling_probs_torch(z, 0.0), torch.nn.functional.one_hot(torch.tensor(3), V).double())
    for p in (0.3, 0.6, 0.9):
        q = sampling_probs_torch(z, 1.0, top_p=p)
        full = torch.softmax(z, 0)
        kept = torch.nonzero(q).flatten()
        mass = float(full[kept].sum())
        assert mass >= p - 1e-12, f"top_p={p}: kept mass {mass}"
        weakest = kept[torch.argmin(full[kept])]
        assert mass - float(full[weakest]) < p, f"top_p={p}: the set is not minimal"
        assert torch.allclose(q[kept], full[kept] / mass, atol=1e-12)


def test_greedy_takes_the_lowest_id_among_tied_maxima():
    z = _logits()
    rows = z[None].repeat(3, 1)
    out = sample(rows, torch.zeros(3), torch.zeros(3, dtype=torch.int64), torch.ones(3),
                 torch.rand(3, dtype=torch.float64))
    assert out.tolist() == [3, 3, 3]


def test_greedy_and_sampled_rows_share_a_batch():
    z = _logits()
    rows = z[None].repeat(2, 1)
    out = sample(rows, torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), torch.ones(2), torch.tensor([0.5, 0.999]))
    assert out.tolist() == [3, 9]  # row 1: top-1 keeps the tie {3, 9} (3 first); u = 0.999 lands on 9


def test_stream_is_uniform_deterministic_and_keyed():
    u = [stream_uniform(0, 5, 1, t) for t in range(20000)]
    assert all(0.0 <= x < 1.0 for x in u)
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert stream_uniform(1, 2, 3, 4) == stream_uniform(1, 2, 3, 4)
    keys = [(1, 2, 3, 4), (0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0)]
    assert len({stream_uniform(*k) for k in keys}) == len(keys)
    adjacent = [stream_uniform(0, i, 0, 0) for i in range(2000)]  # prompts 0, 1, 2, ... are not correlated
    x, y = torch.tensor(adjacent[:-1]), torch.tensor(adjacent[1:])
    assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.1


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), r"max_new_tokens=0 is invalid"),
    (dict(max_new_tokens=-3), r"max_new_tokens=-3 is invalid"),
    (dict(temperature=-0.5), r"temperature=-0.5 is invalid"),
    (dict(temperature=math.inf), r"temperature=inf is invalid"),
    (dict(top_p=0.0), r"top_p=0.0 is invalid: expected a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 is invalid"),
    (dict(top_k=-1), r"top_k=-1 is invalid"),
    (dict(n=0), r"n=0 is invalid"),
    (dict(stop=("",)), r"stop=\(''.*is invalid"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_sampling_parameters_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
