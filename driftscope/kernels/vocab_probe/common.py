"""What the vocab_probe backends share: the result type, the input checks, the flagged (NaN/Inf) rows and the recount
merge of the fused backends (triton's fused kernel, cpp). The dispatching `vocab_probe()` is the package's."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLAGGED = -1  # the integer results of a flagged row: no id (>= 0) and no rank (>= 1) can be -1
_F32, _I64 = torch.float32, torch.int64


def _metric(dtype: torch.dtype, *, targets: bool = False, mean: str | None = None):
    """A VocabProbeResult field: its dtype, whether it needs `targets` (None without them), and `mean`, the report's
    label for its token and sample means in summary.json (None: not averaged)."""
    return field(metadata={"dtype": dtype, "targets": targets, "mean": mean})


@dataclass
class VocabProbeResult:
    """Per-token vocabulary metrics, all [N]. The one list of them: a new metric is a line here and its computation
    in each backend; TokenMetrics' columns, summary.json's means and the report's rows follow from `mean`.

    With z_b = h_base·w_baseᵀ, z_t = h_tuned·w_tunedᵀ (fp32 logits from fp32 accumulation; DESIGN.md §3),
    q = softmax(z_b), p = softmax(z_t), y = target:
        kl_tb = Σ_v p_v (log p_v − log q_v)      kl_bt = Σ_v q_v (log q_v − log p_v)
        lse_* = log Σ_v e^{z_v}                  entropy_* = lse − Σ_v softmax(z)_v z_v
        logp_* = z_y − lse                       rank_* = 1 + #{v : z_v > z_y}   (ties favour y)
        top_* = lowest id among the maxima       rank_shift_top = 1 + #{v : z_b,v > z_b,top_tuned}
    Ranks are exact with respect to the logits the backend computes: the count is strict, so an entry
    equal to the target's logit (a duplicate LM-head row) never counts.
    Flagged rows: a token whose h_base or h_tuned row holds NaN/Inf, or whose logits overflowed (non-finite lse
    or KL), has every float result NaN and every integer result FLAGGED (-1), on every backend: never a rank
    of 1 or another plausible number. Consumers never average them in (TokenMetrics: NaN means; ShiftedTokens:
    left out)."""

    kl_tb: torch.Tensor = _metric(_F32, mean="KL(tuned ‖ base)")
    kl_bt: torch.Tensor = _metric(_F32, mean="KL(base ‖ tuned)")
    logp_base: torch.Tensor | None = _metric(_F32, targets=True, mean="log p base of the actual token")
    logp_tuned: torch.Tensor | None = _metric(_F32, targets=True, mean="log p tuned of the actual token")
    rank_base: torch.Tensor | None = _metric(_I64, targets=True, mean="rank base of the actual token")
    rank_tuned: torch.Tensor | None = _metric(_I64, targets=True, mean="rank tuned of the actual token")
    top_base: torch.Tensor = _metric(_I64)
    top_tuned: torch.Tensor = _metric(_I64)
    rank_shift_top: torch.Tensor = _metric(_I64, mean="base rank of the tuned top-1 token")
    entropy_base: torch.Tensor = _metric(_F32, mean="entropy base")
    entropy_tuned: torch.Tensor = _metric(_F32, mean="entropy tuned")
    lse_base: torch.Tensor = _metric(_F32)
    lse_tuned: torch.Tensor = _metric(_F32)

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Metric(NamedTuple):
    """A VocabProbeResult field as `_metric` declared it."""

    name: str
    dtype: torch.dtype
    targets: bool
    mean: str | None


METRICS: tuple[Metric, ...] = tuple(Metric(f.name, **f.metadata) for f in fields(VocabProbeResult))


def _check_inputs(h_base, w_base, h_tuned, w_tuned, targets, valid_vocab):
    """Validate user inputs (ValueError naming the argument); return the heads cut to the vocabulary."""
    named = {"h_base": h_base, "w_base": w_base, "h_tuned": h_tuned, "w_tuned": w_tuned}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D ([N, d] or [V, d]), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    device = h_base.device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but h_base is on {device}; all inputs must share a device")
    if h_base.shape[0] != h_tuned.shape[0]:
        raise ValueError(f"h_base has {h_base.shape[0]} tokens but h_tuned has {h_tuned.shape[0]}")
    for model, h, w in (("base", h_base, w_base), ("tuned", h_tuned, w_tuned)):
        if h.shape[1] != w.shape[1]:
            raise ValueError(f"h_{model} has d={h.shape[1]} but w_{model} rows have d={w.shape[1]}")
        if h.shape[1] == 0:
            raise ValueError(f"h_{model} has d=0")
    vb, vt = w_base.shape[0], w_tuned.shape[0]
    if valid_vocab is None:
        if vb != vt:
            raise ValueError(
                f"vocabulary sizes differ: w_base has {vb} rows, w_tuned has {vt}; pass valid_vocab=<tokenizer "
                f"vocab size> (<= {min(vb, vt)}) if the extra rows are ids the tokenizer never produces"
            )
        vocab = vb
    else:
        vocab = int(valid_vocab)
        if not 1 <= vocab <= min(vb, vt):
            raise ValueError(
                f"valid_vocab={valid_vocab} is not covered by both heads (w_base has {vb} rows, w_tuned has {vt}); "
                f"expected 1 <= valid_vocab <= {min(vb, vt)}"
            )
    if vocab == 0:
        raise ValueError("w_base and w_tuned have 0 rows (empty vocabulary)")
    if targets is not None:
        if not isinstance(targets, torch.Tensor):
            raise ValueError(f"targets must be a torch.Tensor or None, got {type(targets).__name__}")
        if targets.dim() != 1 or targets.shape[0] != h_base.shape[0]:
            raise ValueError(f"targets must have shape [{h_base.shape[0]}], got {tuple(targets.shape)}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
        if targets.device != device:
            raise ValueError(f"targets is on {targets.device} but h_base is on {device}")
        if targets.numel():
            bad = (targets < 0) | (targets >= vocab)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"targets[{i}]={int(targets[i])} is outside the vocabulary [0, {vocab})")
        targets = targets.to(torch.int64).contiguous()
    return w_base[:vocab], w_tuned[:vocab], targets, vocab


_FINITE_HEADS = WeakTensorKeyDictionary()  # LM head -> (version, vocab) when last found finite


def _check_finite_head(name: str, w: torch.Tensor, vocab: int) -> None:
    """ValueError naming `name` when the first `vocab` rows of LM head `w` hold NaN/Inf (every token's softmax
    reads every row, so no result could be trusted). Once per tensor and version: a run passes the same head
    each batch, and in-place writes bump the version (an inference tensor has none: checked once)."""
    key = (-1 if w.is_inference() else w._version, vocab)
    if _FINITE_HEADS.get(w) == key:
        return
    if bool(torch.isfinite(torch.stack(torch.aminmax(w[:vocab]))).all()):  # NaN propagates: one pass, no [V, d] temp
        _FINITE_HEADS[w] = key  # (0.16 s -> 0.01 s for a [151936, 256] fp32 head, every run's first batch)
        return
    bad = ~torch.isfinite(w[:vocab]).all(1)
    if bool(bad.any()):
        raise ValueError(f"{name} holds NaN/Inf in {int(bad.sum())} of its {vocab} vocabulary rows (first: row "
                         f"{int(bad.nonzero()[0, 0])}); expected a finite LM head")
    _FINITE_HEADS[w] = key


def _flag_rows(r: VocabProbeResult, rows: torch.Tensor) -> VocabProbeResult:
    """r with `rows` ([N] bool) and the rows whose lse or KL is non-finite flagged (see VocabProbeResult)."""
    rows = rows | ~torch.isfinite(torch.stack([r.lse_base, r.lse_tuned, r.kl_tb, r.kl_bt])).all(0)
    fill = lambda t: t.masked_fill(rows, torch.nan if t.is_floating_point() else FLAGGED)  # noqa: E731
    return VocabProbeResult(**{k: None if t is None else fill(t) for k, t in r.to_dict().items()})


def _empty_result(n: int, device, has_targets: bool) -> VocabProbeResult:
    return VocabProbeResult(**{m.name: torch.empty(n, dtype=m.dtype, device=device)
                               if has_targets or not m.targets else None for m in METRICS})


Counts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _merge_recount(
    recount: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[Counts, Counts]],
    shift: torch.Tensor,
    gt_b: torch.Tensor | None,
    gt_t: torch.Tensor | None,
    zpre_b: torch.Tensor | None,
    zpre_t: torch.Tensor | None,
    zy_b: torch.Tensor | None,
    zy_t: torch.Tensor | None,
    *,
    zb_top: torch.Tensor,
    heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    targets: torch.Tensor | None,
    force: bool = False,
    **metrics: torch.Tensor | None,
) -> VocabProbeResult:
    """The ranks of a fused scan, with the rows the scan cannot decide recounted exactly.

    shift: [N] rank_shift_top from the top-k (-1 where it cannot decide); gt_*: [N] strict counts against the
    prologue target logits zpre_*; zy_*: the scanned target logits (all None without targets); zb_top: the
    scanned base logit at the tuned top-1 (metrics["top_tuned"]). A row needs the second pass when shift < 0 or
    zpre != zy (or always, with `force`). `recount(need_s, need_b, need_t)` runs that pass and returns the
    counts (cnt_s, cnt_b, cnt_t) against the scanned values, each reference column excluded, and the logits it
    recomputed at those columns (z_b at top_tuned, z_b at y, z_t at y), all read only where the masks are set;
    it is called only when some row needs it. The counts are exact if the recomputed logits are the scanned
    ones bit for bit (identical deterministic GEMM calls); a recomputed reference logit that differs proves
    they are not, and that row's count is redone by `_exact_counts_f64` from heads = (h_base, w_base, h_tuned,
    w_tuned) instead. `metrics` are the other VocabProbeResult fields, passed through."""
    has_t = gt_b is not None
    need_s = (shift < 0) | force  # the top-k cannot decide: count the base rank exactly
    need_b = (zpre_b != zy_b) | force if has_t else torch.zeros_like(need_s)
    need_t = (zpre_t != zy_t) | force if has_t else torch.zeros_like(need_s)
    rank_b = gt_b + 1 if has_t else None
    rank_t = gt_t + 1 if has_t else None
    if bool((need_s | need_b | need_t).any()):
        (cnt_s, cnt_b, cnt_t), (re_s, re_b, re_t) = recount(need_s, need_b, need_t)
        h_b, w_b, h_t, w_t = heads
        cnt_s = _checked(cnt_s, need_s, re_s, zb_top, h_b, w_b, metrics["top_tuned"])
        shift = torch.where(need_s, cnt_s + 1, shift)
        if has_t:
            rank_b = torch.where(need_b, _checked(cnt_b, need_b, re_b, zy_b, h_b, w_b, targets) + 1, rank_b)
            rank_t = torch.where(need_t, _checked(cnt_t, need_t, re_t, zy_t, h_t, w_t, targets) + 1, rank_t)
    return VocabProbeResult(rank_base=rank_b, rank_tuned=rank_t, rank_shift_top=shift, **metrics)


def _checked(cnt, need, z_again, z_scan, h, w, ref):
    """cnt, except on the rows in need whose recomputed reference logit is not bitwise the scanned one: there
    the second pass's logits are not the scan's, so its count is unfounded and the float64 count replaces it."""
    bad = need & (z_again.view(torch.int32) != z_scan.view(torch.int32))
    if not bool(bad.any()):
        return cnt
    rows = bad.nonzero()[:, 0]
    return cnt.index_put((rows,), _exact_counts_f64(h, w, rows, ref[rows]))


def _exact_counts_f64(h: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor,
                      budget: int = 1 << 24) -> torch.Tensor:
    """#{v : z_v > z_ref} for each row i of z = h[rows]·wᵀ (w: the valid vocabulary), z in float64 and each row
    counted against its own float64 logit at column ref[i] (which never counts itself).

    The fallback when a second pass did not reproduce the scan's logits: the threshold and the counted logits
    come from the same float64 tensor, so no bit identity between passes is assumed. fp32 products are exact in
    float64 and the sum of d of them is rounded at 2⁻⁵³, so the count is exact for logits that are exact in
    float64 (integer-valued data, the tests) and otherwise exact for the true dot products up to that rounding;
    it can differ from an fp32 count where distinct logits round to the same fp32 value. Correct and slow, and
    only for the rare rows that need it: per row V·d float64 multiply-adds, plus float64 copies of W (in chunks
    of `budget` elements, redone per group of budget/V rows) and a [rows, V] float64 block per group."""
    v, d = w.shape
    group, chunk = max(1, budget // v), max(1, budget // d)
    out = torch.empty(rows.numel(), dtype=torch.int64, device=h.device)
    for g0 in range(0, rows.numel(), group):
        hg = h[rows[g0:g0 + group]].double()
        z = torch.empty((hg.shape[0], v), dtype=torch.float64, device=h.device)
        for c0 in range(0, v, chunk):
            z[:, c0:c0 + chunk] = hg @ w[c0:c0 + chunk].double().T
        out[g0:g0 + group] = (z > z.gather(1, ref[g0:g0 + group, None])).sum(1)
    return out
