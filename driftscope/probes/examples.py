"""The examples that moved most, with bounded memory: the k samples with the largest mean KL(tuned ‖ base) (their
scored tokens and per-token KL) and the k scored tokens with the largest KL (a context window of the sample's scored
token ids, both models' top-n next tokens and probabilities, computed only for rows entering the store).

Order: KL descending, ties by (sample id, position) ascending, so the stores are a function of the data alone:
equal to a brute-force top-k, whatever the batches, merges (state "cat" + re-selection on load) or resumes.
Rows with a NaN KL (flagged by the vocab probe) and samples with one are never stored.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from driftscope.probes.base import Accumulator, json_float

__all__ = ["TopExamples", "TopN"]

# rows [R] of the batch -> (base ids [R, n], base probs [R, n], tuned ids [R, n], tuned probs [R, n])
TopN = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
_S = ("s_ids", "s_mean", "s_len", "s_tok", "s_kl")  # samples: [S], [S], [S], flat [ΣS_len] x2
_T = ("t_sid", "t_pos", "t_kl", "t_ctx", "t_bid", "t_bp", "t_tid", "t_tp")  # tokens: [T] x3, [T, 2w+1], [T, n] x4


def _order(value: torch.Tensor, key1: torch.Tensor, key2: torch.Tensor) -> torch.Tensor:
    """Indices sorting by value descending, then key1, key2 ascending (stable sorts, last key first)."""
    o = torch.argsort(key2, stable=True)
    o = o[torch.argsort(key1[o], stable=True)]
    return o[torch.argsort(value[o], descending=True, stable=True)]


class TopExamples(Accumulator):
    """`update(kl, targets, sample_ids, top_n)` per batch; every sample's scored rows arrive whole, in order, in one
    batch (as TokenMetrics assumes). k: rows kept per store; window: scored ids each side of a stored token; n: the
    top-n next tokens of each model."""

    def __init__(self, k: int, window: int = 8, n: int = 5) -> None:
        if min(k, n) < 1 or window < 0:
            raise ValueError(f"k, n must be >= 1 and window >= 0, got {k}, {n}, {window}")
        self.k, self.window, self.n = int(k), int(window), int(n)
        self.s = {"s_ids": torch.zeros(0, dtype=torch.int64), "s_mean": torch.zeros(0, dtype=torch.float64),
                  "s_len": torch.zeros(0, dtype=torch.int64), "s_tok": torch.zeros(0, dtype=torch.int64),
                  "s_kl": torch.zeros(0, dtype=torch.float32)}
        w, i64, f32 = 2 * self.window + 1, torch.int64, torch.float32
        self.t = {"t_sid": torch.zeros(0, dtype=i64), "t_pos": torch.zeros(0, dtype=i64),
                  "t_kl": torch.zeros(0, dtype=torch.float64), "t_ctx": torch.zeros(0, w, dtype=i64),
                  "t_bid": torch.zeros(0, self.n, dtype=i64), "t_bp": torch.zeros(0, self.n, dtype=f32),
                  "t_tid": torch.zeros(0, self.n, dtype=i64), "t_tp": torch.zeros(0, self.n, dtype=f32)}

    # ---- update -------------------------------------------------------------------------------------------------
    def update(self, kl: torch.Tensor, targets: torch.Tensor, sample_ids: torch.Tensor, top_n: TopN) -> None:
        """kl, targets, sample_ids: [N] of the scored rows (any device); top_n: see TopN (called once, with at most
        k rows)."""
        kl32 = kl.detach().to("cpu", torch.float32)
        kl, tg, sid = kl32.double(), targets.detach().to("cpu", torch.int64), sample_ids.detach().to("cpu", torch.int64)
        n = kl.shape[0]
        if n == 0:
            return
        ids, inv, counts = torch.unique_consecutive(sid, return_inverse=True, return_counts=True)
        assert ids.unique().numel() == ids.numel(), "a sample's scored rows must be contiguous in one batch"
        start = torch.cumsum(counts, 0) - counts
        pos = torch.arange(n) - start[inv]
        # samples: the batch's candidates with the store, the top k kept
        mean = torch.zeros(ids.shape[0], dtype=torch.float64).index_add_(0, inv, kl) / counts
        ok = ~mean.isnan()
        rows = [(int(i), float(m), int(c), tg[s:s + c], kl32[s:s + c])
                for i, m, c, s, good in zip(ids.tolist(), mean.tolist(), counts.tolist(), start.tolist(),
                                            ok.tolist()) if good]
        self._keep_samples(rows)
        # tokens: the batch's top k first, then against the store; only the rows that stay get their top-n
        good = torch.nonzero(~kl.isnan()).flatten()
        cand = good[_order(kl[good], sid[good], pos[good])[:self.k]]
        all_kl = torch.cat([self.t["t_kl"], kl[cand]])
        all_sid, all_pos = torch.cat([self.t["t_sid"], sid[cand]]), torch.cat([self.t["t_pos"], pos[cand]])
        keep = _order(all_kl, all_sid, all_pos)[:self.k]
        old = keep[keep < self.t["t_kl"].shape[0]]
        new = cand[keep[keep >= self.t["t_kl"].shape[0]] - self.t["t_kl"].shape[0]]
        if new.numel():
            bid, bp, tid, tp = (x.detach().to("cpu") for x in top_n(new))
            w = self.window
            offs = torch.arange(-w, w + 1)
            at = new[:, None] + offs[None, :]  # [R, 2w+1] batch rows
            inside = (at >= 0) & (at < n)
            at_c = at.clamp(0, n - 1)
            same = inside & (sid[at_c] == sid[new][:, None])
            ctx = torch.where(same, tg[at_c], torch.full_like(at_c, -1))
            add = {"t_sid": sid[new], "t_pos": pos[new], "t_kl": kl[new], "t_ctx": ctx, "t_bid": bid.to(torch.int64),
                   "t_bp": bp.float(), "t_tid": tid.to(torch.int64), "t_tp": tp.float()}
            self.t = {key: torch.cat([self.t[key][old], add[key]]) for key in _T}
        else:
            self.t = {key: self.t[key][old] for key in _T}
        self._sort_tokens()

    def _sample_rows(self) -> list[tuple]:
        lens = self.s["s_len"].tolist()
        ends = torch.cumsum(self.s["s_len"], 0).tolist()
        return [(i, m, c, self.s["s_tok"][e - c:e], self.s["s_kl"][e - c:e])
                for i, m, c, e in zip(self.s["s_ids"].tolist(), self.s["s_mean"].tolist(), lens, ends)]

    def _keep_samples(self, new_rows: list[tuple]) -> None:
        rows = self._sample_rows() + new_rows
        rows.sort(key=lambda r: (-r[1], r[0]))
        rows = rows[:self.k]
        self.s = {"s_ids": torch.tensor([r[0] for r in rows], dtype=torch.int64),
                  "s_mean": torch.tensor([r[1] for r in rows], dtype=torch.float64),
                  "s_len": torch.tensor([r[2] for r in rows], dtype=torch.int64),
                  "s_tok": torch.cat([r[3] for r in rows]) if rows else torch.zeros(0, dtype=torch.int64),
                  "s_kl": torch.cat([r[4] for r in rows]) if rows else torch.zeros(0, dtype=torch.float32)}

    def _sort_tokens(self) -> None:
        o = _order(self.t["t_kl"], self.t["t_sid"], self.t["t_pos"])[:self.k]
        self.t = {key: v[o] for key, v in self.t.items()}

    # ---- merge / state ------------------------------------------------------------------------------------------
    def merge(self, other: "TopExamples") -> "TopExamples":
        self._check_mergeable(other)
        if (other.k, other.window, other.n) != (self.k, self.window, self.n):
            raise ValueError(f"cannot merge TopExamples(k, window, n) {(other.k, other.window, other.n)} into "
                             f"{(self.k, self.window, self.n)}")
        self._keep_samples(other._sample_rows())
        self.t = {key: torch.cat([self.t[key], other.t[key]]) for key in _T}
        self._sort_tokens()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors; every key but "config" concatenates across processes ("cat"): load re-selects the top k."""
        return {"config": torch.tensor([self.k, self.window, self.n], dtype=torch.int64),
                **{key: v.clone() for key, v in {**self.s, **self.t}.items()}}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        k, window, n = state["config"].tolist()
        if (k, window, n) != (self.k, self.window, self.n):
            raise ValueError(f"the saved examples have (k, window, n) {(k, window, n)}, this run "
                             f"{(self.k, self.window, self.n)}")
        self.s = {key: state[key].clone() for key in _S}
        self.t = {key: state[key].clone() for key in _T}
        rows = self._sample_rows()
        self.s = {key: v[:0] for key, v in self.s.items()}
        self._keep_samples(rows)
        self._sort_tokens()

    # ---- finalize -----------------------------------------------------------------------------------------------
    def finalize(self, decode: Callable[[int], str] | None = None) -> dict:
        """{"top_samples": [{sample_id, mean_kl, token_ids, kl, (texts)}], "top_tokens": [{sample_id, position, kl,
        context_ids (the token at `window`; -1 outside the sample), base_top / tuned_top [{id, p, (text)}]}]}."""
        text = (lambda ids: [decode(i) if i >= 0 else None for i in ids]) if decode else None
        samples = [{"sample_id": i, "mean_kl": json_float(m), "token_ids": tok.tolist(),
                    "kl": [json_float(x) for x in kl.tolist()], **({"texts": text(tok.tolist())} if text else {})}
                   for i, m, _, tok, kl in self._sample_rows()]
        tops = lambda ids, ps: [{"id": i, "p": json_float(p), **({"text": decode(i)} if decode else {})}
                                for i, p in zip(ids.tolist(), ps.tolist())]
        tokens = [{"sample_id": int(self.t["t_sid"][r]), "position": int(self.t["t_pos"][r]),
                   "kl": json_float(self.t["t_kl"][r]), "context_ids": self.t["t_ctx"][r].tolist(),
                   **({"context_texts": text(self.t["t_ctx"][r].tolist())} if text else {}),
                   "base_top": tops(self.t["t_bid"][r], self.t["t_bp"][r]),
                   "tuned_top": tops(self.t["t_tid"][r], self.t["t_tp"][r])}
                  for r in range(self.t["t_kl"].shape[0])]
        return {"k": self.k, "window": self.window, "top_samples": samples, "top_tokens": tokens}
