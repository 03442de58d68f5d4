"""Shared helpers for the probe tests: a fake vocab-probe result and a verbose allclose."""
from __future__ import annotations

import torch

FIELDS = ("kl_tb", "kl_bt", "logp_base", "logp_tuned", "rank_base", "rank_tuned", "top_base", "top_tuned",
          "rank_shift_top", "entropy_base", "entropy_tuned", "lse_base", "lse_tuned")


def fake_probe(n: int, seed: int = 0, vocab: int = 50) -> dict[str, torch.Tensor]:
    """[n] tensors shaped like kernels.vocab_probe's result (float32 metrics, int64 ranks/ids)."""
    g = torch.Generator().manual_seed(seed)
    f = lambda: torch.rand(n, generator=g, dtype=torch.float32)  # noqa: E731
    i = lambda hi: torch.randint(1, hi, (n,), generator=g)  # noqa: E731
    top_b = i(vocab)
    top_t = torch.where(torch.rand(n, generator=g) < 0.6, top_b, i(vocab))
    return {
        "kl_tb": f() ** 3, "kl_bt": f() ** 3, "logp_base": -8 * f() ** 2, "logp_tuned": -30 * f() ** 4,
        "rank_base": i(200), "rank_tuned": i(20), "top_base": top_b, "top_tuned": top_t,
        "rank_shift_top": i(30), "entropy_base": 3 * f(), "entropy_tuned": 2 * f(),
        "lse_base": f(), "lse_tuned": f(),
    }


def subset(probe: dict, idx) -> dict:
    return {k: v[idx] for k, v in probe.items()}


def assert_close(actual, expected, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """allclose in float64 that prints mismatch count, max error and the first bad indices with both values."""
    a = torch.as_tensor(actual, dtype=torch.float64).flatten()
    e = torch.as_tensor(expected, dtype=torch.float64).flatten()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs()) & ~(a.isnan() & e.isnan())
    if bad.any():
        idx = torch.nonzero(bad).flatten()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} mismatches, max abs err {err.max().item():.3e} "
            f"(rtol {rtol}, atol {atol}); first bad " + ", ".join(f"[{i}] {a[i].item()!r} vs {e[i].item()!r}" for i in idx))
