"""Token metrics for one dataset: token- and sample-means of the vocab-probe outputs, the paper's sampled KL,
rank shift, top-1 agreement and fixed-edge histograms; per-sample float64 sums, so merge is exact.

Definitions are DESIGN.md §3. Use one `TokenMetrics` per dataset (drift_run.bundle: one per task and tuned model).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from driftscope.kernels.vocab_probe.common import METRICS
from driftscope.probes.base import Accumulator, field, json_float

__all__ = ["TokenMetrics", "MEANS", "PROBE_FIELDS", "KL_EDGES", "RANK_SHIFT_EDGES", "RANK_EDGES", "PAPER_EPS",
           "histogram_counts", "mean_of_task_means"]

PAPER_EPS = 1e-10  # the paper adds this to both probabilities before taking logs (calculate_KL.py)

# Histogram bin convention (all histograms): with finite, increasing `edges` e_0 < ... < e_{m-1},
# counts has m+1 entries: counts[0] = #{v < e_0}, counts[i] = #{e_{i-1} <= v < e_i}, counts[m] = #{v >= e_{m-1}}.
# KL (nats): 10 log-spaced bins per decade from 1e-8 to 1e2; exact zeros and tiny negative rounding land in counts[0].
KL_EDGES: tuple[float, ...] = tuple(10.0 ** (k / 10) for k in range(-80, 21))
# Rank shift rank_base - rank_tuned (an integer): one bin per integer in [-5, 5], then symmetric wider bins
# (6..10, 11..20, 21..50, 51..100, 101..1000, 1001..10^4, 10^4+1..10^5, and beyond), mirrored for negatives.
_MAGS = (1, 2, 3, 4, 5, 10, 20, 50, 100, 1000, 10000, 100000)
RANK_SHIFT_EDGES: tuple[float, ...] = tuple(
    [-float(m) for m in reversed(_MAGS)] + [0.0, 1.0] + [float(m + 1) for m in _MAGS]
)
# Ranks (>= 1), e.g. rank_shift_top: 1, 2, 3, 4, 5, 6..10, 11..20, 21..50, 51..100, 101..1000, ..., > 10^5.
RANK_EDGES: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 11.0, 21.0, 51.0, 101.0, 1001.0, 10001.0, 100001.0)

_HISTS = {"kl_tb": KL_EDGES, "kl_bt": KL_EDGES, "rank_shift": RANK_SHIFT_EDGES, "rank_shift_top": RANK_EDGES}

# The means of summary.json and of the report's table, name -> label: the rank shift, then every vocab_probe
# result with a `mean` (declared on VocabProbeResult, the one list of per-token metrics).
MEANS: dict[str, str] = {"rank_shift": "rank shift (rank_base − rank_tuned)",
                         **{m.name: m.mean for m in METRICS if m.mean is not None}}
_DERIVED_FROM = ("rank_base", "rank_tuned", "top_base", "top_tuned")  # rank shift, top-1 agreement
PROBE_FIELDS = tuple(m.name for m in METRICS if m.mean is not None or m.name in _DERIVED_FROM)  # what update reads
# Per-sample float64 sums, one column each. "paper_*" columns skip the first response token.
_COLS = ("tokens", *MEANS, "top1_agree", "paper_tokens", "paper_log_ratio", "paper_rank_shift")
_AVERAGED = _COLS[1:-3]  # finalize's token_mean and sample_mean


def histogram_counts(values: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    """int64 counts [len(edges)+1] of the finite `values` under the bin convention above (NaN/Inf: no bin)."""
    e, values = torch.tensor(edges, dtype=torch.float64), values.detach().to("cpu", torch.float64)
    idx = torch.bucketize(values[torch.isfinite(values)], e, right=True)
    return torch.bincount(idx, minlength=len(edges) + 1)


def mean_of_task_means(per_task: Mapping[str, dict], metric: str = "rank_shift", mean: str = "token_mean") -> float:
    """The paper's headline aggregate: plain mean over tasks of each task's `finalize()[mean][metric]`
    (e.g. token rank shift). Tasks with no value (None) make the result NaN rather than being dropped."""
    vals = [r[mean][metric] for r in per_task.values()]
    if not vals or any(v is None for v in vals):
        return float("nan")
    return sum(vals) / len(vals)


class TokenMetrics(Accumulator):
    """Accumulates per-token vocab-probe outputs of one dataset.

    Assumption (asserted): every sample's scored tokens arrive in a single `update` call -- the runner packs
    whole samples into a batch -- so per-sample sums are complete when stored and a sample id is never seen
    twice (not across updates, not across merged accumulators). Per-sample sums are kept (a float64 per column
    and sample) and dataset totals are summed at `finalize` in sample-id order, so the result is bitwise
    independent of batch order and of how the data was split before `merge`.
    """

    def __init__(self) -> None:
        self._ids: list[torch.Tensor] = []   # per update: [S_b] int64, sorted, unique
        self._sums: list[torch.Tensor] = []  # per update: [S_b, len(_COLS)] float64
        self._seen: set[int] = set()
        self._hist = {k: torch.zeros(len(e) + 1, dtype=torch.int64) for k, e in _HISTS.items()}

    # ---- update -------------------------------------------------------------------------------------
    def update(self, probe: Any, sample_ids: torch.Tensor, first_response_token: torch.Tensor) -> None:
        """Fold in one batch.

        probe: mapping or object (a VocabProbeResult) with the `[N]` tensors PROBE_FIELDS of the N scored
            positions; its flagged rows (rank_shift_top < 1) make every mean they reach NaN.
        sample_ids: [N] int64, the global sample index of each scored token.
        first_response_token: [N] bool, True at the position predicting a sample's first response token
            (skipped by the paper's sampled KL).
        """
        f = {k: field(probe, k).detach().to("cpu") for k in PROBE_FIELDS}
        sample_ids = sample_ids.detach().to("cpu", torch.int64)
        first = first_response_token.detach().to("cpu", torch.bool)
        n = sample_ids.shape[0]
        for k, v in [*f.items(), ("sample_ids", sample_ids), ("first_response_token", first)]:
            if v.shape != (n,):
                raise ValueError(f"{k} has shape {tuple(v.shape)}, expected ({n},) like sample_ids")
        if n == 0:
            return
        flag = f["rank_shift_top"] < 1  # a row vocab_probe flagged (NaN/Inf): its integer values are NaN here too
        d = {k: v.to(torch.float64) if v.is_floating_point() else v.to(torch.float64).masked_fill(flag, torch.nan)
             for k, v in f.items()}
        keep = (~first).to(torch.float64)
        lp_t, lp_b = d["logp_tuned"], d["logp_base"]
        paper_lr = torch.log(torch.exp(lp_t) + PAPER_EPS) - torch.log(torch.exp(lp_b) + PAPER_EPS)
        rank_shift = (f["rank_base"].to(torch.int64) - f["rank_tuned"].to(torch.int64)).to(torch.float64)
        rank_shift, agree = (t.masked_fill(flag, torch.nan) for t in (
            rank_shift, (f["top_base"] == f["top_tuned"]).double()))
        col = {**d, "tokens": torch.ones(n, dtype=torch.float64), "rank_shift": rank_shift, "top1_agree": agree,
               "paper_tokens": keep, "paper_log_ratio": paper_lr * keep, "paper_rank_shift": rank_shift * keep}
        vals = torch.stack([col[c] for c in _COLS], dim=1)  # [N, len(_COLS)]
        ids, inverse = torch.unique(sample_ids, sorted=True, return_inverse=True)
        sums = torch.zeros(ids.shape[0], len(_COLS), dtype=torch.float64).index_add_(0, inverse, vals)
        self._add_samples(ids, sums)
        for k, v in (("kl_tb", d["kl_tb"]), ("kl_bt", d["kl_bt"]), ("rank_shift", rank_shift),
                     ("rank_shift_top", d["rank_shift_top"])):
            self._hist[k] += histogram_counts(v, _HISTS[k])

    def _add_samples(self, ids: torch.Tensor, sums: torch.Tensor) -> None:
        new = ids.tolist()
        again = self._seen.intersection(new)
        assert not again, (
            f"samples {sorted(again)[:10]} were already accumulated: a sample must arrive whole in one batch "
            "and in one accumulator (the runner packs whole samples)")
        self._seen.update(new)
        self._ids.append(ids)
        self._sums.append(sums)

    # ---- merge / state ------------------------------------------------------------------------------
    def merge(self, other: "TokenMetrics") -> "TokenMetrics":
        self._check_mergeable(other)
        for ids, sums in zip(other._ids, other._sums):
            self._add_samples(ids.clone(), sums.clone())
        for k in self._hist:
            self._hist[k] += other._hist[k]
        return self

    def _table(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(ids [S], {column: sums [S]}) sorted by sample id."""
        if not self._ids:
            return torch.zeros(0, dtype=torch.int64), dict(zip(_COLS, torch.zeros(len(_COLS), 0, dtype=torch.float64)))
        ids, sums = torch.cat(self._ids), torch.cat(self._sums)
        order = torch.argsort(ids)
        return ids[order], dict(zip(_COLS, sums[order].unbind(1)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        ids, col = self._table()
        sd = {"sample_ids": ids, **{f"sample_sums.{c}": v.contiguous() for c, v in col.items()}}
        for k, e in _HISTS.items():
            sd[f"hist.{k}"] = self._hist[k].clone()
            sd[f"edges.{k}"] = torch.tensor(e, dtype=torch.float64)
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, e in _HISTS.items():
            if not torch.equal(state[f"edges.{k}"], torch.tensor(e, dtype=torch.float64)):
                raise ValueError(f"state has different histogram edges for {k!r}; it was written by another version")
        cols = sorted(k.removeprefix("sample_sums.") for k in state if k.startswith("sample_sums."))
        if cols != sorted(_COLS):
            raise ValueError(f"state has the per-sample columns {cols}, expected {sorted(_COLS)}; it was written by "
                             "another version")
        sums = torch.stack([state[f"sample_sums.{c}"].to(torch.float64) for c in _COLS], dim=1)  # [S, len(_COLS)]
        self.__init__()
        if state["sample_ids"].numel():
            self._add_samples(state["sample_ids"].to(torch.int64).clone(), sums.clone())
        for k in _HISTS:
            self._hist[k] = state[f"hist.{k}"].to(torch.int64).clone()

    # ---- finalize -----------------------------------------------------------------------------------
    def per_sample(self) -> dict[str, list]:
        """Per-sample table (columns as lists, sorted by sample id): sample_id, tokens, the mean of each metric,
        and paper_log_ratio (the sample's sampled-KL term, None when no token is left after the skip)."""
        ids, col = self._table()
        out: dict[str, list] = {"sample_id": ids.tolist(), "tokens": col["tokens"].to(torch.int64).tolist()}
        for c in _AVERAGED:
            out[c] = (col[c] / col["tokens"]).tolist()
        ok = col["paper_tokens"] > 0
        lr = torch.where(ok, col["paper_log_ratio"] / col["paper_tokens"].clamp_min(1), torch.nan)
        out["paper_log_ratio"] = [json_float(v) for v in lr.tolist()]
        return out

    def finalize(self) -> dict:
        """JSON dict: tokens, samples, token_mean{...}, sample_mean{...}, sampled_kl{...}, histograms{...}."""
        _, col = self._table()
        tokens, samples = col["tokens"].sum(), col["tokens"].shape[0]
        per_sample = {c: col[c] / col["tokens"] for c in _AVERAGED}  # every stored sample has >= 1 token
        paper_ok = col["paper_tokens"] > 0  # the paper drops samples with no token left after the skip
        paper_per_sample = col["paper_log_ratio"][paper_ok] / col["paper_tokens"][paper_ok]
        signed = paper_per_sample.mean() if paper_per_sample.numel() else torch.tensor(float("nan"))
        nan = float("nan")
        return {
            "tokens": int(tokens.item()),
            "samples": samples,
            "token_mean": {c: json_float(col[c].sum() / tokens if samples else nan) for c in _AVERAGED},
            "sample_mean": {c: json_float(per_sample[c].mean() if samples else nan) for c in _AVERAGED},
            "sampled_kl": {
                "value": json_float(abs(signed)),
                "signed": json_float(signed),
                "samples": int(paper_ok.sum().item()),
                "tokens": int(col["paper_tokens"].sum().item()),
                "definition": "per sample mean over response tokens except the first of "
                              "log(p_y+1e-10)-log(q_y+1e-10), p tuned, q base; mean over samples; abs",
            },
            "rank_shift_paper_tokens": {  # rank_base - rank_tuned over the sampled-KL token set
                "token_mean": json_float(col["paper_rank_shift"].sum() / col["paper_tokens"].sum()
                                         if paper_ok.any() else nan),
                "sample_mean": json_float((col["paper_rank_shift"][paper_ok] / col["paper_tokens"][paper_ok]).mean()
                                          if paper_ok.any() else nan),
            },
            "histograms": {
                k: {"edges": list(e), "counts": self._hist[k].tolist(),
                    "bins": "counts[0]: v<edges[0]; counts[i]: edges[i-1]<=v<edges[i]; counts[-1]: v>=edges[-1]"}
                for k, e in _HISTS.items()
            },
        }
