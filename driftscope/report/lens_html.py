"""report.html's sections of the logit lens (summary.json "lens", "self_lens", "promoted_tokens") and of the examples
that moved most ("examples"); each is "" when the run had none."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from driftscope.report import plots
from driftscope.report.markup import details as _details, dig as _get, esc, fmt, html_table, token_cell as _token_cell
from driftscope.report.tables import visible_text

__all__ = ["lens_section", "examples_section"]

LENS_CAPTION = (
    "Logit lens: at each chosen hidden-state index (0 = embeddings, last = after the final norm, equal to the output "
    "numbers above) each model's state read through its own final norm and LM head. Left: KL between the two models' "
    "lens distributions (token mean); middle: how often their top-1 tokens agree; right: each model's KL(own output ‖ "
    "lens at the index), 0 at the last index: how early each model settles on its final prediction.")

_LENS_COLS = (("KL(t‖b)", "kl_tb"), ("KL(b‖t)", "kl_bt"), ("rank shift", "rank_shift"),
              ("log p tuned", "logp_tuned"))


def lens_section(t: Mapping, label: str, figures: Callable[..., str]) -> str:
    """The logit-lens section: the figure, a table per index (with each model's KL(output ‖ lens)) and the
    promoted / suppressed tokens per index; "" when the run had no --lens."""
    lens, self_lens = t.get("lens"), t.get("self_lens") or {}
    if not lens:
        return ""
    out = ["<h3>Logit lens</h3>\n", figures(f"logit lens, {label}", LENS_CAPTION, plots.lens_png, lens,
                                             self_lens, title=label)]
    selfs = {who: {r["index"]: r for r in self_lens.get(who) or []} for who in ("base", "tuned")}
    header = ["index", *(c for c, _ in _LENS_COLS), "top-1 agree", "KL(out‖lens) base", "KL(out‖lens) tuned"]
    rows = [[esc(r["index"]), *(fmt(_get(r, k, "token_mean")) for _, k in _LENS_COLS), fmt(r.get("top1_agreement")),
             *(fmt(_get(selfs[who].get(r["index"]), "kl_bt", "token_mean")) for who in ("base", "tuned"))]
            for r in lens]
    out.append(_details(f"Logit lens per index ({len(lens)} indices, token means)",
                        html_table(header, rows, numeric_from=1), open_=True))
    promoted = t.get("promoted_tokens") or []
    if promoted:
        cell = lambda side: " ".join(_token_cell(visible_text(x.get("text"))) if x.get("text") is not None
                                     else esc(x.get("id")) for x in side[:10])
        prow = [[esc(p["index"]), fmt(p.get("tokens")), cell(p.get("promoted") or []),
                 cell(p.get("suppressed") or [])] for p in promoted]
        out.append(_details("Promoted / suppressed tokens per index (W_base·(γ ⊙ mean(h_tuned − h_base)), top 10)",
                            html_table(["index", "tokens", "promoted", "suppressed"], prow, numeric_from=4)))
    return "".join(out)


def _kl_text(texts: Sequence[str | None], kls: Sequence[float | None], top: float) -> str:
    """Token texts on a background whose red grows with the token's KL (relative to `top`), the KL in its tooltip."""
    spans = []
    for text, kl in zip(texts, kls):
        a = 0.0 if kl is None or top <= 0 else min(max(kl / top, 0.0), 1.0)
        spans.append(f'<span style="background:rgba(220,40,40,{a:.2f})" title="KL {fmt(kl)}">'
                     f"{esc(visible_text(text))}</span>")
    return f'<pre style="white-space:pre-wrap">{"".join(spans)}</pre>\n'


def examples_section(t: Mapping) -> str:
    """The samples and tokens that moved most (summary.json "examples"); "" when the run kept none."""
    ex = t.get("examples")
    if not ex:
        return ""
    out = ["<h3>Examples that moved most</h3>\n<p class=\"muted\">Scored tokens coloured by KL(tuned ‖ base): "
           "the darker the red, the larger the token's KL (hover for the value).</p>\n"]
    samples = ex.get("top_samples") or []
    top = max((k for s in samples for k in s.get("kl") or [] if k is not None), default=0.0)
    body = "".join(f"<p>sample {esc(s['sample_id'])}: mean KL {fmt(s.get('mean_kl'))}, "
                   f"{len(s.get('token_ids') or [])} tokens</p>\n"
                   + _kl_text(s.get("texts") or [str(i) for i in s.get("token_ids") or []], s.get("kl") or [], top)
                   for s in samples)
    out.append(_details(f"Top {len(samples)} samples by mean KL", body or '<p class="muted">none</p>\n'))
    tops = lambda side: " ".join(f"{_token_cell(visible_text(x.get('text')) if 'text' in x else str(x.get('id')))}"
                                 f" {fmt(x.get('p'), 3)}" for x in side)
    rows = []
    for x in ex.get("top_tokens") or []:
        ctx, w = x.get("context_texts") or [str(i) for i in x.get("context_ids") or []], ex.get("window", 0)
        ctx = ["" if i < 0 else c for c, i in zip(ctx, x.get("context_ids") or [])]
        shown = esc(visible_text("".join(ctx[:w]))) + f"<b>[{esc(visible_text(ctx[w] if w < len(ctx) else ''))}]</b>" \
            + esc(visible_text("".join(ctx[w + 1:])))
        rows.append([esc(x.get("sample_id")), esc(x.get("position")), fmt(x.get("kl")), f"<code>{shown}</code>",
                     tops(x.get("base_top") or []), tops(x.get("tuned_top") or [])])
    out.append(_details(f"Top {len(rows)} tokens by KL", html_table(
        ["sample", "position", "KL(t‖b)", "context [token]", "base top-5 (p)", "tuned top-5 (p)"], rows,
        numeric_from=6)))
    return "".join(out)
