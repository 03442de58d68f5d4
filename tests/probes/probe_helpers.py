"""Shared helpers for the probe tests: a fake vocab-probe result and a verbose allclose."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from driftscope.kernels.vocab_probe.common import METRICS

FIELDS = tuple(m.name for m in METRICS)


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
            f"(rtol {rtol}, atol {atol}); first bad "
            + ", ".join(f"[{i}] {a[i].item()!r} vs {e[i].item()!r}" for i in idx))


# ---- the paper's padded query vectors (transformers' view), the reference for paper-mode PCA ----------------
def paper_pad_batch(token_ids: Sequence[Sequence[int]], pad_id: int, max_length: int = 128,
                    pad_to: str = "longest") -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's `tokenizer(texts, padding=True, truncation=True, max_length=128)` with padding_side="left":
    keep each text's first `max_length` tokens, left-pad with `pad_id` to the batch width W.

    pad_to="longest" (the paper's code, padding=True): W = longest truncated text, so W = 128 only when some
    text reaches 128 tokens. pad_to="max_length" (DESIGN.md's wording "all 128 positions"): W = max_length.
    Returns (input_ids [B, W] int64, attention_mask [B, W] int64).
    """
    if pad_to not in ("longest", "max_length"):
        raise ValueError(f"pad_to must be 'longest' or 'max_length', got {pad_to!r}")
    seqs = [list(t)[:max_length] for t in token_ids]
    width = max_length if pad_to == "max_length" else max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.int64)
            mask[i, width - len(s):] = 1
    return ids, mask


def paper_query_vectors(hidden_states_per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
    """[L+1] x [B, W, d] padded states -> [L+1, B, d] float32: `hs.to(float32).mean(dim=1)`, padding included.

    The states are transformers' `output_hidden_states` for the left-padded batch of `paper_pad_batch`: layer 0
    is the embedding output, the last one is after the final norm. Pad positions carry real (nonzero) states:
    in the paper's run (flash_attention_2) attention at a pad position outputs zero, so a pad state is the pad
    token's embedding pushed through the residual + MLP path only; position_ids are arange(W), so real tokens
    sit at positions n_pad.. (RoPE is relative, so only rounding differs from an unpadded run).
    """
    return torch.stack([hs.to(torch.float32).mean(dim=1) for hs in hidden_states_per_layer])


def paper_query_vectors_from_real(real_states_per_layer: Sequence[torch.Tensor],
                                  pad_state_per_layer: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Same vector for one query from its T real-token states [L+1] x [T, d] and the per-layer pad state [L+1] x [d]
    (what a packed runner has): (Σ_t h_t + (W − T)·h_pad) / W per layer, in float64, returned float32 [L+1, d]."""
    out = []
    for h, pad in zip(real_states_per_layer, pad_state_per_layer, strict=True):
        t = h.shape[0]
        if t > width:
            raise ValueError(f"query has {t} tokens, more than the padded width {width}")
        v = h.to(torch.float64).sum(0) + (width - t) * pad.to(torch.float64)
        out.append((v / width).to(torch.float32))
    return torch.stack(out)
