"""llama.cpp's `llama-perplexity --kl-divergence` statistics of one dataset, so a quantization (or any tuned model)
can be compared with the numbers llama.cpp users know: PPL ratio, KLD mean / percentiles / max, Δp, same top p.

Rules as in llama.cpp tools/perplexity/perplexity.cpp (`kl_divergence`, `mean_and_uncertainty`, `covariance`,
`percentile`), ggml-org/llama.cpp at 050fc7f3, with base = the reference model and Q = the tuned (quantized) one:
- per token: KLD = Σ_v q_v (log q_v − log p_v) = vocab_probe's `kl_bt` (q base, p tuned);
  Δp = p_y − q_y = exp(logp_tuned) − exp(logp_base); same top = (top_base == top_tuned); nll = −logp_tuned,
  nll_base = −logp_base.
- mean ± err of x over n tokens: m = Σx/n; err = sqrt((Σx²/n − m²)/(n−1)) when that variance is > 0 and n > 10,
  else 0. cov(a, b) = (Σab/n − (Σa/n)(Σb/n))/(n−1), 0 when n < 10.
- ln(PPL(Q)/PPL(base)) = mean(nll) − mean(nll_base) ± sqrt(err² + err_base² − 2 cov); PPL(Q)/PPL(base) = exp of it
  ± ratio·err; PPL(Q) = exp(mean nll) ± PPL·err; PPL(Q)−PPL(base) ± sqrt(u² + u_base² − 2·PPL·PPL_base·cov).
- percentile(f) of the float32 values sorted ascending: f <= 0 -> first, f >= 1 -> last; else, in float32,
  p = f·(n−1), i = floor(p), p −= i, value = (1−p)·v[i] + p·v[min(i+1, n−1)]. Median: v[n/2] for odd n, else
  0.5·(v[n/2] + v[n/2−1]) (float32). KLD: 99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1 %; Δp also 75.0 and 25.0 %.
- RMS Δp = sqrt(mean Δp²) ± 0.5/RMS · err(Δp²) (err from Σ Δp⁴); same top p = k/n ± sqrt(p(1−p)/(n−1)).
Δp and same top p are fractions here (llama.cpp prints them ×100, in %). Differences from llama.cpp's numbers on the
same logits: llama.cpp stores the base log-probs quantized to 16 bits and drops base log-probs below −16 from its
KLD sum; here both are exact (fp32 logits). llama.cpp prints these only from 100 tokens on; here they are given for
any count (errors 0 up to 10 tokens, as its rule says; None where its formula divides by zero).

Memory: the per-token KLD and Δp are kept as float32 (8 bytes per scored token) so percentiles stay exact across
merges (merge concatenates); the moments are float64 sums. Flagged rows (vocab_probe's NaN/Inf rows) and rows with
non-finite KLD / log p are left out and counted.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from driftscope.probes.base import Accumulator, field, json_float

__all__ = ["KLDStats", "KLD_PERCENTILES", "DP_PERCENTILES", "PROBE_FIELDS", "llama_percentile", "llama_median",
           "llama_cpp_line", "llama_cpp_rows"]

KLD_PERCENTILES = ("99.9", "99.0", "95.0", "90.0", "10.0", "5.0", "1.0", "0.1")  # llama.cpp's order; median apart
DP_PERCENTILES = ("99.9", "99.0", "95.0", "90.0", "75.0", "25.0", "10.0", "5.0", "1.0", "0.1")
PROBE_FIELDS = ("kl_bt", "logp_base", "logp_tuned", "top_base", "top_tuned", "rank_shift_top")  # what update reads
_SUMS = ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "dp", "dp2", "dp4")
_COUNTS = ("tokens", "same_top", "flagged")


def llama_percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's `percentile` of float32 `sorted_values` (ascending, non-empty) at `fraction` (a float32
    literal there, e.g. 0.999f), all in float32."""
    v, f = sorted_values, np.float32(fraction)
    if f <= 0:
        return float(v[0])
    if f >= 1:
        return float(v[-1])
    p = np.float32(f * np.float32(v.size - 1))
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    return float(np.float32(np.float32(np.float32(1) - p) * v[ip]) + np.float32(p * v[min(ip + 1, v.size - 1)]))


def llama_median(sorted_values: np.ndarray) -> float:
    """llama.cpp's median of float32 `sorted_values` (ascending, non-empty)."""
    v, n = sorted_values, sorted_values.size
    return float(v[n // 2] if n % 2 else np.float32(np.float32(0.5) * np.float32(v[n // 2] + v[n // 2 - 1])))


def _mean_err(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty (NaN, NaN for n = 0 where llama.cpp prints nothing)."""
    if n < 1:
        return math.nan, math.nan
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _cov(sa: float, sb: float, sab: float, n: int) -> float:
    return 0.0 if n < 10 else (sab / n - (sa / n) * (sb / n)) / (n - 1)


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def _sqrt(x: float) -> float:
    """sqrt as C computes it: NaN for a negative argument (llama.cpp's error formulas can go below 0)."""
    return math.sqrt(x) if x >= 0 else math.nan


def _exp(x: float) -> float:
    return math.inf if x >= 709 else math.exp(x)  # NaN stays NaN


class KLDStats(Accumulator):
    """Accumulates llama.cpp's --kl-divergence statistics of one (tuned model, dataset); see the module docstring.

    Merge is exact: the per-token values are concatenated (percentiles do not depend on the split) and the float64
    sums added (equal to float64 rounding)."""

    def __init__(self) -> None:
        self._kld: list[torch.Tensor] = []  # per update: [n] float32
        self._dp: list[torch.Tensor] = []   # per update: [n] float32
        self._sums = torch.zeros(len(_SUMS), dtype=torch.float64)
        self._counts = torch.zeros(len(_COUNTS), dtype=torch.int64)

    def update(self, probe: Any) -> None:
        """Fold in one batch. probe: mapping or object (a VocabProbeResult) with the [N] tensors PROBE_FIELDS;
        its flagged rows (rank_shift_top < 1) and rows with a non-finite kl_bt / logp are left out and counted."""
        f = {k: field(probe, k).detach().to("cpu") for k in PROBE_FIELDS}
        n = f["kl_bt"].shape[0]
        for k, v in f.items():
            if v.shape != (n,):
                raise ValueError(f"{k} has shape {tuple(v.shape)}, expected ({n},) like kl_bt")
        kld, lb, lt = (f[k].to(torch.float64) for k in ("kl_bt", "logp_base", "logp_tuned"))
        ok = (f["rank_shift_top"] >= 1) & torch.isfinite(kld) & torch.isfinite(lb) & torch.isfinite(lt)
        kld, lb, lt = kld[ok], lb[ok], lt[ok]
        dp = lt.exp() - lb.exp()
        nll, nll_b = -lt, -lb
        parts = {"nll": nll, "nll2": nll * nll, "nll_base": nll_b, "nll_base2": nll_b * nll_b,
                 "nll_nll_base": nll * nll_b, "kld": kld, "kld2": kld * kld, "dp": dp, "dp2": dp * dp,
                 "dp4": (dp * dp) ** 2}
        self._sums += torch.stack([parts[k].sum() for k in _SUMS])
        same = (f["top_base"] == f["top_tuned"])[ok]
        self._counts += torch.tensor([int(ok.sum()), int(same.sum()), int(n - ok.sum())], dtype=torch.int64)
        self._kld.append(kld.to(torch.float32))
        self._dp.append(dp.to(torch.float32))

    # ---- merge / state ------------------------------------------------------------------------------------------
    def merge(self, other: "KLDStats") -> "KLDStats":
        self._check_mergeable(other)
        self._kld += [t.clone() for t in other._kld]
        self._dp += [t.clone() for t in other._dp]
        self._sums += other._sums
        self._counts += other._counts
        return self

    def _values(self) -> tuple[torch.Tensor, torch.Tensor]:
        cat = lambda ts: torch.cat(ts) if ts else torch.zeros(0, dtype=torch.float32)  # noqa: E731
        return cat(self._kld), cat(self._dp)

    def state_dict(self) -> dict[str, torch.Tensor]:
        kld, dp = self._values()
        return {"values.kld": kld, "values.dp": dp, "sums": self._sums.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in ("values.kld", "values.dp", "sums", "counts") if k not in state]
        if missing or state["sums"].shape != (len(_SUMS),) or state["counts"].shape != (len(_COUNTS),):
            raise ValueError(f"KLDStats state has keys {sorted(state)} (sums {len(_SUMS)}, counts {len(_COUNTS)} "
                             "expected); it was written by another version")
        kld, dp = state["values.kld"].to(torch.float32), state["values.dp"].to(torch.float32)
        if kld.shape != dp.shape or kld.shape[0] != int(state["counts"][0]):
            raise ValueError(f"KLDStats state holds {kld.shape[0]} KLD and {dp.shape[0]} Δp values for "
                             f"{int(state['counts'][0])} tokens; expected one of each per token")
        self.__init__()
        self._kld, self._dp = [kld.clone()], [dp.clone()]
        self._sums = state["sums"].to(torch.float64).clone()
        self._counts = state["counts"].to(torch.int64).clone()

    # ---- finalize -----------------------------------------------------------------------------------------------
    def finalize(self) -> dict:
        """JSON dict: tokens, flagged, the PPL block (ppl_q, ppl_base, cor_ln_ppl, ln_ppl_ratio, ppl_ratio,
        ppl_diff), the KLD block (mean_kld, max_kld, kld_percentiles, median_kld, min_kld), the Δp block (mean_dp,
        max_dp, dp_percentiles, median_dp, min_dp, rms_dp) and same_top_p; `<name>_err` beside each value llama.cpp
        prints with a ± error. None where there is no token (or the formula divides by zero)."""
        s = dict(zip(_SUMS, self._sums.tolist()))
        n, same, flagged = self._counts.tolist()
        kld, dp = (np.sort(t.numpy()) for t in self._values())
        ln_q, e_q = _mean_err(s["nll"], s["nll2"], n)
        ln_b, e_b = _mean_err(s["nll_base"], s["nll_base2"], n)
        cov = _cov(s["nll"], s["nll_base"], s["nll_nll_base"], n)
        ln_ratio, ln_ratio_err = ln_q - ln_b, _sqrt(e_q * e_q + e_b * e_b - 2 * cov)
        ppl_q, ppl_b = _exp(ln_q), _exp(ln_b)
        ratio = _exp(ln_ratio)
        mean_kld, mean_kld_err = _mean_err(s["kld"], s["kld2"], n)
        mean_dp, mean_dp_err = _mean_err(s["dp"], s["dp2"], n)
        mse, mse_err = _mean_err(s["dp2"], s["dp4"], n)
        rms = math.sqrt(mse) if n else math.nan
        top = _div(same, n)
        order = lambda v, f: llama_percentile(v, f) if n else math.nan  # noqa: E731
        out = {
            "tokens": n, "flagged": flagged,
            "ppl_q": ppl_q, "ppl_q_err": ppl_q * e_q, "ppl_base": ppl_b, "ppl_base_err": ppl_b * e_b,
            "cor_ln_ppl": _div(cov, e_q * e_b),
            "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": ln_ratio_err,
            "ppl_ratio": ratio, "ppl_ratio_err": ratio * ln_ratio_err,
            "ppl_diff": ppl_q - ppl_b,
            "ppl_diff_err": _sqrt((ppl_q * e_q) ** 2 + (ppl_b * e_b) ** 2 - 2 * ppl_q * ppl_b * cov),
            "mean_kld": mean_kld, "mean_kld_err": mean_kld_err,
            "max_kld": order(kld, 1.0),
            "kld_percentiles": {k: order(kld, float(k) / 100) for k in KLD_PERCENTILES},
            "median_kld": llama_median(kld) if n else math.nan,
            "min_kld": order(kld, 0.0),
            "mean_dp": mean_dp, "mean_dp_err": mean_dp_err,
            "max_dp": order(dp, 1.0),
            "dp_percentiles": {k: order(dp, float(k) / 100) for k in DP_PERCENTILES},
            "median_dp": llama_median(dp) if n else math.nan,
            "min_dp": order(dp, 0.0),
            "rms_dp": rms, "rms_dp_err": _div(0.5, rms) * mse_err if rms else math.nan,
            "same_top_p": top, "same_top_p_err": _sqrt(top * (1 - top) / (n - 1)) if n > 1 else math.nan,
        }
        return {k: ({kk: json_float(vv) for kk, vv in v.items()} if isinstance(v, dict) else
                    v if isinstance(v, int) else json_float(v)) for k, v in out.items()}


def llama_cpp_line(block: Mapping | None) -> str:
    """One line of a finalize() dict for a terminal: "KLD mean … p99 … max …, same top …%, Δp mean …% rms …%"."""
    if not block or not block.get("tokens"):
        return "no scored tokens"

    def num(v, spec: str, scale: float = 1.0) -> str:
        return "n/a" if v is None else format(v * scale, spec)

    p99 = (block.get("kld_percentiles") or {}).get("99.0")
    return (f"KLD mean {num(block['mean_kld'], '.6f')} p99 {num(p99, '.6f')} max {num(block['max_kld'], '.6f')}, "
            f"same top {num(block['same_top_p'], '.3f', 100)} %, Δp mean {num(block['mean_dp'], '.3f', 100)} % "
            f"rms {num(block['rms_dp'], '.3f', 100)} %, PPL(Q)/PPL(base) {num(block['ppl_ratio'], '.6f')}")


def _pm(block: Mapping, key: str, spec: str, scale: float = 1.0, unit: str = "") -> str:
    v, e = block.get(key), block.get(f"{key}_err", "absent")
    text = "n/a" if v is None else format(v * scale, spec)
    if e != "absent":
        text += " ± " + ("n/a" if e is None else format(e * scale, spec))
    return text + unit


def llama_cpp_rows(block: Mapping | None) -> dict[str, list[tuple[str, str]]]:
    """A finalize() dict as llama.cpp prints it: {section: [(label, value text)]}, its sections, labels, order and
    precision (KLD and PPL to 6 decimals, Δp and same top p in % to 3); {} when there is no scored token."""
    if not block or not block.get("tokens"):
        return {}
    kp, dpp = block["kld_percentiles"], block["dp_percentiles"]
    cor = block.get("cor_ln_ppl")
    ppl = [("Mean PPL(Q)", _pm(block, "ppl_q", ".6f")), ("Mean PPL(base)", _pm(block, "ppl_base", ".6f")),
           ("Cor(ln(PPL(Q)), ln(PPL(base)))", "n/a" if cor is None else f"{100 * cor:.2f}%"),
           ("Mean ln(PPL(Q)/PPL(base))", _pm(block, "ln_ppl_ratio", ".6f")),
           ("Mean PPL(Q)/PPL(base)", _pm(block, "ppl_ratio", ".6f")),
           ("Mean PPL(Q)-PPL(base)", _pm(block, "ppl_diff", ".6f"))]
    one = lambda v, s, scale=1.0, unit="": _pm({"v": v}, "v", s, scale, unit)  # noqa: E731
    kld = [("Mean KLD", _pm(block, "mean_kld", ".6f")), ("Maximum KLD", one(block["max_kld"], ".6f"))]
    kld += [(f"{k}% KLD", one(kp[k], ".6f")) for k in KLD_PERCENTILES[:4]]
    kld += [("Median KLD", one(block["median_kld"], ".6f"))]
    kld += [(f"{k}% KLD", one(kp[k], ".6f")) for k in KLD_PERCENTILES[4:]]
    kld += [("Minimum KLD", one(block["min_kld"], ".6f"))]
    pct = lambda v: one(v, ".3f", 100, "%")  # noqa: E731
    dp = [("Mean Δp", _pm(block, "mean_dp", ".3f", 100, " %")), ("Maximum Δp", pct(block["max_dp"]))]
    dp += [(f"{k}% Δp", pct(dpp[k])) for k in DP_PERCENTILES[:5]]
    dp += [("Median Δp", pct(block["median_dp"]))]
    dp += [(f"{k}% Δp", pct(dpp[k])) for k in DP_PERCENTILES[5:]]
    dp += [("Minimum Δp", pct(block["min_dp"])), ("RMS Δp", _pm(block, "rms_dp", ".3f", 100, " %")),
           ("Same top p", _pm(block, "same_top_p", ".3f", 100, " %"))]
    return {"Perplexity statistics": ppl, "KL divergence statistics": kld, "Token probability statistics": dp}
