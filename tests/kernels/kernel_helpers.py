"""Comparison helpers for kernel tests: failures print numbers, not just 'not close'."""
from __future__ import annotations

import torch


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0,
                         what: str = "", max_show: int = 5) -> None:
    """|actual − expected| ≤ atol + rtol·|expected| elementwise (exact equality for integer tensors
    when atol = rtol = 0). On failure: mismatch count, max abs/rel error, first bad indices with
    both values."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().cpu()
    e = expected.detach().cpu()
    if a.dtype.is_floating_point or e.dtype.is_floating_point:
        a64, e64 = a.double(), e.double()
        err = (a64 - e64).abs()
        bad = ~(err <= atol + rtol * e64.abs())  # a NaN on either side counts as bad
        rel = err / e64.abs().clamp_min(1e-300)
        max_abs = err[~err.isnan()].max().item() if (~err.isnan()).any() else float("nan")
        max_rel = rel[~rel.isnan()].max().item() if (~rel.isnan()).any() else float("nan")
    else:
        bad = a != e
        max_abs = (a - e).abs().max().item() if a.numel() else 0
        max_rel = float("nan")
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.nonzero()[:max_show]
        shown = ", ".join(f"{tuple(i.tolist())}: got {a[tuple(i)].item()!r} want {e[tuple(i)].item()!r}" for i in idx)
        raise AssertionError(
            f"{what}: {n_bad}/{a.numel()} mismatched (atol={atol}, rtol={rtol}); max abs err {max_abs:.3g}, "
            f"max rel err {max_rel:.3g}; first bad: {shown}"
        )
