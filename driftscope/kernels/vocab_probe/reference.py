"""torch backend: `vocab_probe_torch`, the fp32 reference (full [N, V] logits), same signature as vocab_probe."""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import fields

import torch

from driftscope.kernels.vocab_probe.common import VocabProbeResult, _check_inputs, _empty_result


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
    computed once. The metrics are elementwise passes over the logits, taken ROWS rows at a time (rows are
    independent) so that a pass's arrays stay in the CPU's last-level cache: 6.5x faster than whole [N, V] passes
    at V = 151,936 on a 32 MiB L3; the GEMMs run BLOCK tokens at a time into buffers reused across blocks.
    Roofline (per pair, N tokens, V vocab, d hidden): 4·N·V·d FLOPs for the two GEMMs (the floor every backend
    pays); bytes ≈ 2·V·d·sizeof(w) + 2·N·d·sizeof(h) for the fused kernels, plus the fp32 logits written and read
    once here. Peak extra memory here is ≈ (1 + J)·BLOCK·V·4 bytes; the fused backends need O(tile·chunk + N·k)
    (cpp: O(tile·V) with its base panel).
    """
    many = isinstance(h_tuned, (list, tuple))
    pairs = list(zip(h_tuned, w_tuned)) if many else [(h_tuned, w_tuned)]
    checked = [_check_inputs(h_base, w_base, h, w, targets, valid_vocab) for h, w in pairs]
    w_base, targets = checked[0][0], checked[0][2]
    n = h_base.shape[0]
    if n == 0:
        out = [_empty_result(0, h_base.device, targets is not None) for _ in pairs]
        return out if many else out[0]
    hb, wb = h_base.float(), w_base.float()
    tuned = [(h.float(), w.float()) for (h, _), (_, w, _, _) in zip(pairs, checked)]
    rows = ROWS if hb.device.type == "cpu" else 1024  # a GPU has no such cache to fit, and pays per launch
    block = max(rows, BLOCK)
    bufs = _workspace.take(1 + len(tuned), min(n, block), wb.shape[0], hb.device)
    try:
        out = _probe(hb, wb, tuned, targets, rows, block, bufs, _Work(min(n, rows), wb.shape[0], hb.device))
    finally:
        _workspace.give(bufs)
    return out if many else out[0]


def _probe(hb, wb, tuned, targets, rows: int, block: int, bufs: list[torch.Tensor], work: "_Work"
           ) -> list[VocabProbeResult]:
    n = hb.shape[0]
    parts = []
    for b0 in range(0, n, block):  # the logits of `block` tokens: [block, V] fp32 base and tuned
        b1 = min(n, b0 + block)
        zb = torch.matmul(hb[b0:b1], wb.T, out=bufs[0][: b1 - b0])
        zts = [torch.matmul(h[b0:b1], w.T, out=buf[: b1 - b0]) for (h, w), buf in zip(tuned, bufs[1:])]
        parts += [_rows(zb[r:r + rows], [zt[r:r + rows] for zt in zts],
                        None if targets is None else targets[b0 + r:b0 + r + rows], work)
                  for r in range(0, b1 - b0, rows)]
    return [_cat([part[j] for part in parts]) for j in range(len(tuned))]


class _Workspace:
    """The CPU's [rows, V] fp32 logit buffers, kept from one call to the next. A GEMM writing into fresh memory pays
    its page faults (+40 ms per [256, 151936] output here), and a J = 4 call after four single-pair calls ran its
    GEMMs 1.4x slower. A call takes buffers out while it runs (concurrent calls never share one) and gives them back;
    per vocabulary size at most as many are kept as one call has taken, the largest, so the memory kept is that of
    the largest call: (1 + J)·BLOCK·V·4 bytes, 777 MB for J = 4 at V = 151,936. `clear()` frees them. On a GPU
    torch's caching allocator already reuses memory: buffers there are plain allocations."""

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}
        self._most: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, count: int, rows: int, vocab: int, device) -> list[torch.Tensor]:
        if torch.device(device).type != "cpu":
            return [torch.empty(rows, vocab, device=device) for _ in range(count)]
        with self._lock:
            self._most[vocab] = max(self._most.get(vocab, 0), count)
            free = self._free.get(vocab, [])
            fits = [b for b in free if b.shape[0] >= rows][:count]
            self._free[vocab] = [b for b in free if all(b is not f for f in fits)]
        return [b[:rows] for b in fits] + [torch.empty(rows, vocab) for _ in range(count - len(fits))]

    def give(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            for b in (b for b in bufs if b.device.type == "cpu"):
                vocab = b.shape[1]
                keep = sorted([*self._free.get(vocab, []), b._base if b._base is not None else b],
                              key=lambda t: -t.shape[0])
                self._free[vocab] = keep[: self._most[vocab]]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._most.clear()


_workspace = _Workspace()


def release_workspace() -> None:
    """Free the CPU logit buffers the torch reference keeps between calls (`_Workspace`)."""
    _workspace.clear()


BLOCK = 256  # tokens per GEMM: their [BLOCK, V] fp32 logits per model are computed, then folded ROWS rows at a time
# rows per elementwise pass on the CPU: the six [ROWS, V] fp32 work arrays take 7.3 MB at V = 151,936; on a 32 MiB L3
# 2 rows ran the J = 4 call 1-5% faster than 4, ~10% faster than 8 and ~18% faster than 1 (bench/RESULTS.md)
ROWS = 2


class _Work:
    """The [rows, V] fp32 arrays of one group of rows, reused by every group: log q, q, log p, p, log p/q and a
    scratch product. A fresh multi-MB tensor per operation costs page faults (glibc returns freed large blocks to the
    system): half the metric time on the CPU before these were reused."""

    def __init__(self, rows: int, vocab: int, device):
        self.lq, self.q, self.lp, self.p, self.ratio, self.tmp = (torch.empty(rows, vocab, device=device)
                                                                  for _ in range(6))

    def take(self, n: int) -> list[torch.Tensor]:
        return [t[:n] for t in (self.lq, self.q, self.lp, self.p, self.ratio, self.tmp)]


def _rows(zb: torch.Tensor, zts: list[torch.Tensor], targets, work: _Work) -> list[VocabProbeResult]:
    """Every pair's metrics for a few rows: the base's log-softmax, softmax and metrics once, then each pair's."""
    lq, q, lp, p, ratio, tmp = work.take(zb.shape[0])
    torch.log_softmax(zb, dim=-1, out=lq)  # log q
    torch.exp(lq, out=q)
    base = _base(zb, lq, q, targets, tmp)  # the base-only metrics, once for every pair
    return [_pair(zb, lq, q, zt, targets, base, (lp, p, ratio, tmp)) for zt in zts]


def _cat(parts: list[VocabProbeResult]) -> VocabProbeResult:
    return VocabProbeResult(**{f.name: None if getattr(parts[0], f.name) is None
                               else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(VocabProbeResult)})


def _dot(a: torch.Tensor, b: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v b_v per row ([N, V] -> [N]) through the scratch `tmp`; torch's cascade sum (a BLAS dot, einsum's
    path, was 2e-5 off)."""
    return torch.mul(a, b, out=tmp).sum(-1)


def _above(z: torch.Tensor, ref: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """#{v : z_v > z_ref} per row ([N, V] logits, [N] ids), int64. The comparison is written as 0.0/1.0 into the fp32
    scratch `tmp` and summed in fp32: every partial sum is an integer <= V < 2²⁴, so the count is exact (and 4x faster
    than summing a bool array, which is converted to integers first)."""
    return torch.gt(z, z.gather(1, ref[:, None]), out=tmp).sum(-1).long()


def _top(z: torch.Tensor) -> torch.Tensor:
    """The lowest id among each row's maxima (torch.max returns the first maximal index, like argmax, at 2.4x its
    speed on the CPU)."""
    return torch.max(z, dim=-1).indices


def _lse(z: torch.Tensor, logp: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """log Σ e^z per row from its log-softmax: lse = z_v − log p_v at any v; at the argmax, z − max = 0 exactly,
    so this is max + log Σ e^{z − max}, logsumexp's own formula, without another pass over [N, V]."""
    return (z.gather(1, top[:, None]) - logp.gather(1, top[:, None]))[:, 0]


def _base(zb: torch.Tensor, lq: torch.Tensor, q: torch.Tensor, targets, tmp: torch.Tensor) -> dict:
    """The metrics of the base logits zb (log-softmax lq, softmax q) alone."""
    top_b = _top(zb)
    base = dict(top_base=top_b, entropy_base=-_dot(q, lq, tmp), lse_base=_lse(zb, lq, top_b), logp_base=None,
                rank_base=None)
    if targets is not None:
        base.update(logp_base=lq.gather(1, targets[:, None])[:, 0], rank_base=1 + _above(zb, targets, tmp))
    return base


def _pair(zb: torch.Tensor, lq: torch.Tensor, q: torch.Tensor, zt: torch.Tensor, targets, base: dict, work
          ) -> VocabProbeResult:
    """The metrics of tuned logits zt against base logits zb (log-softmax lq, softmax q, base-only metrics
    `base`), all [N, V] fp32; `work` holds the [N, V] arrays it writes: log p, p, log p/q and a scratch."""
    lp, p, log_ratio, tmp = work
    torch.log_softmax(zt, dim=-1, out=lp)  # log p
    torch.exp(lp, out=p)
    top_t = _top(zt)
    torch.sub(lp, lq, out=log_ratio)  # log p/q
    res = VocabProbeResult(
        kl_tb=_dot(p, log_ratio, tmp),
        kl_bt=-_dot(q, log_ratio, tmp),
        logp_tuned=None, rank_tuned=None,
        top_tuned=top_t,
        rank_shift_top=1 + _above(zb, top_t, tmp),
        entropy_tuned=-_dot(p, lp, tmp),
        lse_tuned=_lse(zt, lp, top_t),
        **base,
    )
    if targets is not None:
        res.logp_tuned = lp.gather(1, targets[:, None])[:, 0]
        res.rank_tuned = 1 + _above(zt, targets, tmp)
    return res
