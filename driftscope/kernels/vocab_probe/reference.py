"""torch backend: `vocab_probe_torch`, the fp32 reference (full [N, V] logits), same signature as vocab_probe."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from driftscope.kernels.vocab_probe.common import VocabProbeResult, _check_inputs


def vocab_probe_torch(
    h_base: torch.Tensor,
    w_base: torch.Tensor,
    h_tuned: torch.Tensor | Sequence[torch.Tensor],
    w_tuned: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor | None = None,
    *,
    valid_vocab: int | None = None,
) -> VocabProbeResult | list[VocabProbeResult]:
    """fp32 reference, written to be obviously right: full [N, V] logits for both models.

    With sequences of J tuned states and heads, a list of J results; the base logits and their softmax are
    computed once. Roofline (per pair, N tokens, V vocab, d hidden): 4·N·V·d FLOPs for the two GEMMs (the floor
    every backend pays); bytes ≈ 2·V·d·sizeof(w) + 2·N·d·sizeof(h) for the fused kernels, plus ≈ 2·N·V·4 ·
    (1 write + ~6 reads) here, because every step below materializes [N, V] fp32. Peak extra memory here is
    ≈ 6·N·V·4 bytes; the fused backends need O(tile·chunk + N·k).
    """
    many = isinstance(h_tuned, (list, tuple))
    pairs = list(zip(h_tuned, w_tuned)) if many else [(h_tuned, w_tuned)]
    checked = [_check_inputs(h_base, w_base, h, w, targets, valid_vocab) for h, w in pairs]
    w_base, targets = checked[0][0], checked[0][2]
    zb = h_base.float() @ w_base.float().T  # [N, V] base logits
    lq = torch.log_softmax(zb, dim=-1)  # log q
    q = lq.exp()
    base = _base(zb, lq, q, targets)  # the base-only metrics, once for every pair
    out = [_pair(zb, lq, q, h.float() @ w.float().T, targets, base) for (h, _), (_, w, _, _) in zip(pairs, checked)]
    return out if many else out[0]


def _base(zb: torch.Tensor, lq: torch.Tensor, q: torch.Tensor, targets) -> dict:
    """The metrics of the base logits zb (log-softmax lq, softmax q) alone."""
    base = dict(top_base=zb.argmax(-1),  # first maximal index = lowest id on ties
                entropy_base=-(q * lq).sum(-1), lse_base=torch.logsumexp(zb, -1), logp_base=None, rank_base=None)
    if targets is not None:
        y = targets[:, None]
        base.update(logp_base=lq.gather(1, y)[:, 0], rank_base=1 + (zb > zb.gather(1, y)).sum(-1))
    return base


def _pair(zb: torch.Tensor, lq: torch.Tensor, q: torch.Tensor, zt: torch.Tensor, targets, base: dict
          ) -> VocabProbeResult:
    """The metrics of tuned logits zt against base logits zb (log-softmax lq, softmax q, base-only metrics
    `base`), all [N, V] fp32."""
    lp = torch.log_softmax(zt, dim=-1)  # log p
    p = lp.exp()
    top_t = zt.argmax(-1)
    log_ratio = lp - lq  # log p/q
    res = VocabProbeResult(
        kl_tb=(p * log_ratio).sum(-1),
        kl_bt=-(q * log_ratio).sum(-1),
        logp_tuned=None, rank_tuned=None,
        top_tuned=top_t,
        rank_shift_top=1 + (zb > zb.gather(1, top_t[:, None])).sum(-1),
        entropy_tuned=-(p * lp).sum(-1),
        lse_tuned=torch.logsumexp(zt, -1),
        **base,
    )
    if targets is not None:
        y = targets[:, None]
        res.logp_tuned = lp.gather(1, y)[:, 0]
        res.rank_tuned = 1 + (zt > zt.gather(1, y)).sum(-1)
    return res
