"""The Transferability Index (DESIGN §3): how much of a tuned model's math gain carries over to other reasoning
(TI_other) and to non-reasoning (TI_non) benchmarks. Scores are percent under canonical names (see
`benchmarks.canonical_name`).

`transferability_index(base, tuned)` gives one TIResult; `transferability_indices(base, {name: tuned})` many, with
the pooled σ of the domain method taken over all of them. An undefined value is NaN with its reason, never inf.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from driftscope.eval import benchmarks as B
from driftscope.util import json_float

__all__ = ["GROUPS", "BENCHMARKS", "METHODS", "TIResult", "transferability_index", "transferability_indices",
           "pooled_sigma", "resolve_sigma"]

# The groups, in Table 1's order, each with its benchmarks in `eval.benchmarks`' order (from `Benchmark.group`).
GROUPS: dict[str, tuple[str, ...]] = {g: tuple(n for n, b in B.BENCHMARKS.items() if b.group == g)
                                      for g in ("math", "other", "non")}
assert sum(map(len, GROUPS.values())) == len(B.BENCHMARKS), "every Benchmark.group is math, other or non"
BENCHMARKS: tuple[str, ...] = tuple(b for group in GROUPS.values() for b in group)
GROUP_OF: dict[str, str] = {b: g for g, group in GROUPS.items() for b in group}
METHODS = ("relative", "domain")


@dataclass(frozen=True)
class TIResult:
    """One tuned model against the base. `gains`: per group ΔR_g (relative) or DI_g (domain); `deltas`: per
    benchmark (R_t − R_b)/R_b (relative) or R_t − R_b (domain); `sigma`: σ_g used (domain only, else None);
    `reasons`: why each NaN is NaN, keyed "ti_other", "ti_non", "gains.<group>", "deltas.<benchmark>"."""
    method: str
    ti_other: float
    ti_non: float
    gains: dict[str, float]
    deltas: dict[str, float]
    sigma: dict[str, float] | None = None
    sigma_source: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-safe: every NaN becomes None and its reason is under "reasons"."""
        return {"method": self.method, "ti_other": json_float(self.ti_other), "ti_non": json_float(self.ti_non),
                "gains": {k: json_float(v) for k, v in self.gains.items()},
                "deltas": {k: json_float(v) for k, v in self.deltas.items()},
                "sigma": self.sigma, "sigma_source": self.sigma_source, "reasons": dict(self.reasons)}


# ---- inputs ----------------------------------------------------------------------------------------------------
def _scores(scores: Mapping[str, float], side: str) -> dict[str, float]:
    """Canonical names -> finite percent; None and NaN dropped (they read as missing). Bad input raises."""
    out: dict[str, float] = {}
    for key, value in scores.items():
        bench = B.canonical_name(key)
        if bench is None:
            raise ValueError(f"{side} scores: unknown benchmark {key!r} (known: {', '.join(BENCHMARKS)})")
        if bench in out:
            raise ValueError(f"{side} scores: {key!r} names {bench}, which is already given")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{side} scores: {key} must be a number, got {value!r}")
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"{side} scores: {key} = {value!r} is not a percentage in [0, 100]")
        out[bench] = float(value)
    return out


def _raw_deltas(base: Mapping[str, float], tuned: Mapping[str, float]) -> dict[str, float]:
    """R_t − R_b per benchmark where both are present (already canonical)."""
    return {b: tuned[b] - base[b] for b in BENCHMARKS if b in base and b in tuned}


def pooled_sigma(base_scores: Mapping[str, float], tuned: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per group, the population standard deviation (ddof=0) of ΔR_b = R_t,b − R_base,b pooled over every tuned
    model and every benchmark of the group that both sides have; NaN for a group with no such pair, 0 for a spread
    at rounding level (1e-12 relative)."""
    base = _scores(base_scores, "base")
    pooled: dict[str, list[float]] = {g: [] for g in GROUPS}
    for name, scores in tuned.items():
        for b, d in _raw_deltas(base, _scores(scores, f"tuned {name!r}")).items():
            pooled[GROUP_OF[b]].append(d)
    out = {}
    for g, values in pooled.items():
        if not values:
            out[g] = math.nan
            continue
        mean = math.fsum(values) / len(values)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
        # equal ΔR differ by rounding (42.6 + 5 − 42.6 ≠ 5): a spread at that level is no spread
        out[g] = 0.0 if std <= 1e-12 * max(1.0, *(abs(v) for v in values)) else std
    return out


def resolve_sigma(sigma: float | Mapping[str, float] | str | None, base_scores: Mapping[str, float],
                  tuned: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, float], str]:
    """(σ per group, where it came from): None → 1 for every group ("default"); a number → that for every group
    ("constant"); a mapping with all three groups ("per-group"); "pooled" → `pooled_sigma` over `tuned`."""
    if sigma is None:
        return {g: 1.0 for g in GROUPS}, "default"
    if isinstance(sigma, str):
        if sigma != "pooled":
            raise ValueError(f"sigma must be a number, a per-group mapping or 'pooled', got {sigma!r}")
        return pooled_sigma(base_scores, tuned), "pooled"
    if isinstance(sigma, Mapping):
        unknown = sorted(set(sigma) - set(GROUPS))
        missing = [g for g in GROUPS if g not in sigma]
        if unknown or missing:
            raise ValueError(f"sigma mapping needs exactly the groups {', '.join(GROUPS)}; "
                             + (f"unknown {unknown}" if unknown else f"missing {missing}"))
        values, source = {g: sigma[g] for g in GROUPS}, "per-group"
    else:
        values, source = {g: sigma for g in GROUPS}, "constant"
    for g, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"sigma for group {g} must be a positive finite number, got {v!r}")
    return {g: float(v) for g, v in values.items()}, source


# ---- the two methods ---------------------------------------------------------------------------------------------
def _missing_reason(bench: str, base: Mapping[str, float], tuned: Mapping[str, float]) -> str | None:
    sides = [side for side, s in (("base", base), ("tuned", tuned)) if bench not in s]
    return f"{bench} is missing from the {' and '.join(sides)} scores" if sides else None


def _relative_group(group: str, base, tuned, deltas: dict, reasons: dict) -> float:
    """ΔR_g = mean_b (R_t,b − R_base,b)/R_base,b, filling deltas and reasons."""
    for b in GROUPS[group]:
        why = _missing_reason(b, base, tuned)
        if why is None and base[b] == 0.0:
            why = f"base score of {b} is 0: its relative gain (R_t − R_b)/R_b is undefined"
        if why is None:
            deltas[b] = (tuned[b] - base[b]) / base[b]
        else:
            deltas[b] = math.nan
            reasons[f"deltas.{b}"] = why
    bad = [reasons[f"deltas.{b}"] for b in GROUPS[group] if math.isnan(deltas[b])]
    if bad:
        reasons[f"gains.{group}"] = f"ΔR_{group} undefined: " + "; ".join(bad)
        return math.nan
    return math.fsum(deltas[b] for b in GROUPS[group]) / len(GROUPS[group])


def _domain_group(group: str, base, tuned, sigma: float, deltas: dict, reasons: dict) -> float:
    """DI_g = Σ_b ŵ_b s_b with s_b = sign(δ_b)|δ_b|^½, δ_b = ΔR_b/σ_g, ΔR_b = R_t,b − R_base,b and
    ŵ_b = (100 − R_base,b)/Σ_u (100 − R_base,u), filling deltas (ΔR_b) and reasons."""
    for b in GROUPS[group]:
        why = _missing_reason(b, base, tuned)
        deltas[b] = math.nan if why else tuned[b] - base[b]
        if why:
            reasons[f"deltas.{b}"] = why
    bad = [reasons[f"deltas.{b}"] for b in GROUPS[group] if math.isnan(deltas[b])]
    if not bad and math.isnan(sigma):
        bad = [f"σ_{group} is undefined (no ΔR to pool)"]
    elif not bad and sigma == 0.0:
        bad = [f"σ_{group} is 0 (the pooled ΔR of the group has no spread)"]
    headroom = math.fsum(100.0 - base[b] for b in GROUPS[group] if b in base)
    if not bad and headroom == 0.0:
        bad = [f"every base score of the {group} group is 100: the weights (100 − R_b)/Σ(100 − R_b) are undefined"]
    if bad:
        reasons[f"gains.{group}"] = f"DI_{group} undefined: " + "; ".join(bad)
        return math.nan
    scaled = {b: deltas[b] / sigma for b in GROUPS[group]}  # δ_b
    return sum((100.0 - base[b]) / headroom * math.copysign(math.sqrt(abs(d)), d) for b, d in scaled.items())


def transferability_index(base_scores: Mapping[str, float], tuned_scores: Mapping[str, float],
                          method: str = "relative",
                          sigma: float | Mapping[str, float] | str | None = None) -> TIResult:
    """TI_other and TI_non of one tuned model (DESIGN §3): TI_g = 100·ΔR_g/ΔR_math (relative) or
    100·DI_g/DI_math (domain). `sigma` (domain only): see `resolve_sigma`; "pooled" pools this one model."""
    return transferability_indices(base_scores, {"tuned": tuned_scores}, method, sigma)["tuned"]


def transferability_indices(base_scores: Mapping[str, float], tuned: Mapping[str, Mapping[str, float]],
                            method: str = "relative",
                            sigma: float | Mapping[str, float] | str | None = None) -> dict[str, TIResult]:
    """`transferability_index` for each tuned model; with sigma="pooled" the σ per group is pooled over all of
    them (the run), the same σ for every model."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "relative" and sigma is not None:
        raise ValueError(f"sigma applies to method='domain' only, got sigma={sigma!r} with method='relative'")
    base = _scores(base_scores, "base")
    models = {name: _scores(scores, f"tuned {name!r}") for name, scores in tuned.items()}
    sig, source = (None, None) if method == "relative" else resolve_sigma(sigma, base, models)
    return {name: _compute(base, scores, method, sig, source) for name, scores in models.items()}


def _compute(base: dict[str, float], tuned: dict[str, float], method: str, sig: dict[str, float] | None,
             source: str | None) -> TIResult:
    deltas: dict[str, float] = {}
    reasons: dict[str, str] = {}
    if sig is None:
        gains = {g: _relative_group(g, base, tuned, deltas, reasons) for g in GROUPS}
    else:
        gains = {g: _domain_group(g, base, tuned, sig[g], deltas, reasons) for g in GROUPS}
    name = "ΔR_math" if method == "relative" else "DI_math"
    ti = {}
    for g in ("other", "non"):
        if math.isnan(gains["math"]):
            reasons[f"ti_{g}"] = f"TI_{g} undefined: {reasons['gains.math']}"
        elif gains["math"] == 0.0:
            reasons[f"ti_{g}"] = f"TI_{g} undefined: the math gain {name} is 0"
        elif math.isnan(gains[g]):
            reasons[f"ti_{g}"] = f"TI_{g} undefined: {reasons[f'gains.{g}']}"
        ti[g] = math.nan if f"ti_{g}" in reasons else 100.0 * gains[g] / gains["math"]
    return TIResult(method=method, ti_other=ti["other"], ti_non=ti["non"], gains=gains,
                    deltas={b: deltas[b] for b in BENCHMARKS}, sigma=None if sig is None else dict(sig),
                    sigma_source=source, reasons=reasons)
