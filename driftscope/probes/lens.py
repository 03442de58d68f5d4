"""Logit-lens drift (DESIGN.md §3): at chosen hidden-state indices i, each model's next-token distribution read
through its own final norm and LM head, z^(i) = W·norm(h_i) (i < L) and z^(L) = W·h_L, compared between the models
with the fused vocab probe (never [N, V] logits), and each model against its own output ("self-lens"); and the
promoted / suppressed tokens s_i = W_base·(γ_base ⊙ Δμ_i), Δμ_i the mean of h_tuned,i − h_base,i over scored tokens.

Extra head GEMMs per batch, with n' chosen indices below L and J tuned models: (1 + J)·n', each model's lens logits
once per index for its cross and its self pair; the output logits the self pairs need are the output probe's own
(`outputs_and_lens`: one vocab_probe_pairs call gives the output probe's results and the lens's). E.g. `every:4` on
40 layers (n' = 10), J = 1: 20 [N, V] GEMMs beside the output probe's 2 (separate calls took 2·(1 + J)·(n' + 1)).
Memory: the chosen states, kept from the forward to the vocab step, and their normed copies during the update:
2·(1 + J)·(n' + 1)·N·d elements in the models' dtype, beside the probe's workspace (cpp: a [tile, V] fp32 panel per
base side while they fit DRIFTSCOPE_CPP_PANEL_MIB, a 16 MiB [tile, chunk] buffer per other source; a call takes
at most ~SOURCES_PER_CALL sources, the outputs again for each further group of indices).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from driftscope.errors import InputError
from driftscope.kernels.vocab_probe import VocabProbeResult, vocab_probe_pairs
from driftscope.probes.base import Accumulator
from driftscope.probes.token_metrics import TokenMetrics

__all__ = ["parse_lens", "lens_indices", "LensModel", "LensHeads", "LensDrift", "promoted_scores"]

SOURCES_PER_CALL = 32  # a vocab_probe_pairs call's (model, index) sources at most, outputs included (about: a
# group of indices takes the models' outputs once more: `--lens all` with J = 4 recomputes them every 5 indices)


def parse_lens(spec: str | None) -> str | int | list[int] | None:
    """The syntax of `--lens`: None (off: None, "", "none"), "all", K of "every:K" (K >= 1) or the indices of "i,j,k"
    (sorted, unique, >= 0); InputError naming the option otherwise."""
    if spec is None or str(spec).strip() in ("", "none"):
        return None
    s = str(spec).strip()
    if s == "all":
        return s
    try:
        if s.startswith("every:"):
            k = int(s.removeprefix("every:"))
            if k < 1:
                raise ValueError
            return k
        out = sorted({int(x) for x in s.split(",")})
        if out[0] < 0:
            raise ValueError
        return out
    except ValueError:
        raise InputError(f"lens={spec!r} (--lens): expected 'all', 'every:K' (K >= 1) or indices 'i,j,k' "
                         "(hidden-state indices, 0 = embeddings)") from None


def lens_indices(spec: str | None, n_states: int) -> list[int]:
    """The hidden-state indices of `--lens` over n_states = L + 1 states: None/"" -> [] (off), "all" -> 0..L,
    "every:K" -> 0, K, 2K, ... and always L, "i,j,k" -> those (sorted, unique), each in [0, L]."""
    last, p = n_states - 1, parse_lens(spec)
    if p is None:
        return []
    if p == "all":
        return list(range(n_states))
    if isinstance(p, int):
        return sorted({*range(0, n_states, p), last})
    if p[-1] > last:
        raise InputError(f"lens={spec!r} (--lens): hidden-state indices must be in [0, {last}] (L = {last} layers)")
    return p


@dataclass
class LensModel:
    """One model's lens: `norm` its final norm ([N, d] on the probe device -> [N, d] there), `head` its LM-head rows
    [V, d] on the probe device, `gamma` the final norm's weight [d] (promoted tokens: the base's only)."""

    norm: Callable[[torch.Tensor], torch.Tensor]
    head: torch.Tensor
    gamma: torch.Tensor | None = None


@dataclass
class LensHeads:
    """What the lens needs of the models: the chosen indices, n_states = L + 1, the base, each tuned model, each
    pair's vocab_probe `valid_vocab` (as the output probe's) and top_k, the promoted / suppressed tokens kept."""

    indices: list[int]
    n_states: int
    base: LensModel
    tuned: list[LensModel]
    valid_vocab: list[int | None]
    top_k: int = 20

    @classmethod
    def of_models(cls, spec: str | None, base, tuned: Sequence, valid_vocab: Sequence[int | None],
                  top_k: int = 20) -> "LensHeads":
        """From engine Transformers (final_norm, lm_head_weight, norm.weight); `spec` (--lens) chooses the indices, none
        when off (the heads still serve the example stores). Each norm runs on its model's device; states and heads
        are on the base's."""
        n_states = base.config.num_layers + 1
        idx = lens_indices(spec, n_states)
        dev = base.device

        def model(m) -> LensModel:
            return LensModel(lambda h: m.final_norm(h.to(m.device)).to(dev), m.lm_head_weight.to(dev),
                             m.norm.weight.detach().to(dev))
        return cls(idx, n_states, model(base), [model(t) for t in tuned], list(valid_vocab), top_k)


def promoted_scores(head: torch.Tensor, gamma: torch.Tensor | None, mean_diff: torch.Tensor) -> torch.Tensor:
    """s = W·(γ ⊙ Δμ) [V] in float64 (γ None: Δμ is already normed, index L), on the head's device; the head is
    converted to float64 8192 rows at a time (a bounded copy)."""
    v = mean_diff.to(head.device, torch.float64)
    if gamma is not None:
        v = v * gamma.to(head.device, torch.float64)
    return torch.cat([head[r:r + 8192].to(torch.float64) @ v for r in range(0, head.shape[0], 8192)])


def _diag(r: VocabProbeResult, side: str) -> VocabProbeResult:
    """A model's output against itself, from the `side` ("base" / "tuned") of an output-probe result r without
    flagged rows: what the fold of identical logits gives (both sides that side's, KL 0, rank_shift_top 1)."""
    g = lambda f: getattr(r, f"{f}_{side}")  # noqa: E731
    return VocabProbeResult(
        kl_tb=torch.zeros_like(r.kl_tb), kl_bt=torch.zeros_like(r.kl_bt), logp_base=g("logp"), logp_tuned=g("logp"),
        rank_base=g("rank"), rank_tuned=g("rank"), top_base=g("top"), top_tuned=g("top"),
        rank_shift_top=torch.ones_like(r.rank_shift_top), entropy_base=g("entropy"), entropy_tuned=g("entropy"),
        lse_base=g("lse"), lse_tuned=g("lse"))


class LensDrift(Accumulator):
    """Per chosen index: a TokenMetrics per tuned model (base vs tuned lens: `cross`), per model against its own
    output (`self_base`: one when the base states are shared, `self_tuned`: one per tuned model), and float64 Σ of
    h_tuned − h_base with its token count (promoted tokens). Self-lens roles: "base" = the model's output, "tuned" = its
    lens at i, so kl_bt = KL(output ‖ lens_i) and rank_shift = rank_output − rank_lens."""

    def __init__(self, indices: Sequence[int], n_states: int, n_tuned: int, hidden_size: int) -> None:
        self.indices, self.n_states, self.n_tuned, self.d = list(indices), int(n_states), int(n_tuned), hidden_size
        n = len(self.indices)
        self.cross = [[TokenMetrics() for _ in range(n)] for _ in range(n_tuned)]
        self.self_base = [TokenMetrics() for _ in range(n)]
        self.self_tuned = [[TokenMetrics() for _ in range(n)] for _ in range(n_tuned)]
        self.diff = torch.zeros(n_tuned, n, hidden_size, dtype=torch.float64)  # Σ (h_t − h_b), on the states' device
        self.count = torch.zeros(n, dtype=torch.int64)

    def groups(self) -> list[TokenMetrics]:
        return [*(m for row in self.cross for m in row), *self.self_base, *(m for row in self.self_tuned for m in row)]

    # ---- update -------------------------------------------------------------------------------------------------
    def update(self, heads: LensHeads, states: Mapping[int, tuple[torch.Tensor, list[torch.Tensor]]],
               targets: torch.Tensor, sample_ids: torch.Tensor, first: torch.Tensor,
               outputs: Sequence | None = None, results: dict | None = None) -> None:
        """One batch: `states[i]` = (h_base [N, d], [h_tuned_j [N, d]]) at every chosen index and at L (the final
        normed states); `outputs[j]` the output probe's result of pair j (index L of the cross lens, bit for bit),
        or None to compute it here; `results`: `outputs_and_lens`'s pair results of this batch, then nothing is
        computed here but the mean differences."""
        last = self.n_states - 1
        assert last in states and all(i in states for i in self.indices), "a chosen index's states are missing"
        self.diff = self.diff.to(states[last][0].device)
        for k, i in enumerate(self.indices):
            hb, hts = states[i]
            self.count[k] += hb.shape[0]
            for j, ht in enumerate(hts):
                self.diff[j, k] += (ht.to(torch.float64) - hb.to(torch.float64)).sum(0)
        rs = results if results is not None else self._probe(heads, self._normed(heads, states), targets, outputs)
        for (role, m, k), r in rs.items():
            own = self.self_base[k] if m == 0 else self.self_tuned[m - 1][k]
            (self.cross[m - 1][k] if role == "cross" else own).update(r, sample_ids, first)

    def outputs_and_lens(self, heads: LensHeads, states: Mapping[int, tuple[torch.Tensor, list[torch.Tensor]]],
                         targets: torch.Tensor) -> tuple[list[VocabProbeResult], dict]:
        """The output probe's result of every tuned model, and this batch's lens results for `update(results=...)`,
        from the same vocab_probe_pairs calls: the output logits, which the self pairs need anyway, give the output
        pairs too, so the output probe costs no GEMM of its own. Each output result equals `vocab_probe(h_L base,
        W_base, h_L tuned j, W_j, targets, valid_vocab)` bit for bit (cpp, torch; triton: the same J-tuned call)."""
        rs = self._probe(heads, self._normed(heads, states), targets, None, with_outputs=True)
        return [rs.pop(("output", 1 + j, -1)) for j in range(self.n_tuned)], rs

    def _normed(self, heads: LensHeads, states) -> dict:
        """The lens states: each chosen index's through its model's final norm (index L's are normed already)."""
        last = self.n_states - 1
        return {i: states[i] if i == last else (heads.base.norm(states[i][0]), [m.norm(h) for m, h in
                                                                              zip(heads.tuned, states[i][1])])
                for i in {*self.indices, last}}

    def _probe(self, heads: LensHeads, normed, targets, outputs,
               with_outputs: bool = False) -> dict[tuple[str, int, int], VocabProbeResult]:
        """Every pair's result by (role, model, k): ("cross", 1 + j, k) base vs tuned j at index k, ("self", m, k)
        model m (0 the base, 1 + j tuned j) against its own output, and with `with_outputs` ("output", 1 + j, -1), the
        output probe's pairs. One vocab_probe_pairs call per vocabulary, so each model's lens logits at an index
        are computed once for its cross and its self pair. Index L's cross results are the output probe's (given
        as `outputs` or computed in the call), and its self pairs (an output against itself) come from them: KL 0,
        both sides the output's, rank_shift_top 1, what the fold of identical logits gives bit for bit; folded
        instead for a valid_vocab cut or a flagged row, and without outputs."""
        last, n_models, out = self.n_states - 1, 1 + self.n_tuned, {}
        keys: dict[tuple[int, int], int] = {}
        sources: list[tuple[torch.Tensor, torch.Tensor]] = []
        known = outputs is not None or with_outputs  # index L's results come from the outputs

        def src(m: int, i: int) -> int:  # source id of model m's lens states at index i
            if (m, i) not in keys:
                keys[m, i] = len(sources)
                sources.append((normed[i][0] if m == 0 else normed[i][1][m - 1],
                                heads.base.head if m == 0 else heads.tuned[m - 1].head))
            return keys[m, i]

        def rows(m: int) -> int:
            return (heads.base if m == 0 else heads.tuned[m - 1]).head.shape[0]
        # (valid_vocab, vocabulary, group) -> [(pair, key)]: one call's pairs share a vocabulary, and a group of
        # `per` indices bounds its sources (a [tile, chunk] fp32 buffer each on the cpp backend: 16 MiB)
        calls: dict[tuple, list] = {}
        per = max(1, SOURCES_PER_CALL // n_models - 1)

        def pair(vv, a, b, key, group: int = 0) -> None:
            calls.setdefault((vv, vv or rows(a[0]), group), []).append(((src(*a), src(*b)), key))
        for j in range(self.n_tuned) if with_outputs and outputs is None else ():
            pair(heads.valid_vocab[j], (0, last), (1 + j, last), ("output", 1 + j, -1))
        for k, i in enumerate(self.indices):
            if i == last and known:
                continue
            for j in range(self.n_tuned):
                pair(heads.valid_vocab[j], (0, i), (1 + j, i), ("cross", 1 + j, k), k // per)
            for m in range(n_models):
                pair(None, (m, last), (m, i), ("self", m, k), k // per)
        self._run(calls, sources, targets, out)
        if known and last in self.indices:
            k = self.indices.index(last)
            outs = outputs if outputs is not None else [out["output", 1 + j, -1] for j in range(self.n_tuned)]
            calls = {}
            for j in range(self.n_tuned):
                out["cross", 1 + j, k] = outs[j]
            for m in range(n_models):
                r = outs[max(m - 1, 0)]
                if heads.valid_vocab[max(m - 1, 0)] is None and not bool((r.top_base < 0).any()):
                    out["self", m, k] = _diag(r, "base" if m == 0 else "tuned")
                else:
                    pair(None, (m, last), (m, last), ("self", m, k))
            self._run(calls, sources, targets, out)
        return out

    @staticmethod
    def _run(calls: dict, sources, targets, out: dict) -> None:
        for (vv, *_), todo in calls.items():
            out.update(zip((key for _, key in todo), vocab_probe_pairs(sources, [p for p, _ in todo], targets,
                                                                       valid_vocab=vv)))

    # ---- merge / state ------------------------------------------------------------------------------------------
    def merge(self, other: "LensDrift") -> "LensDrift":
        self._check_mergeable(other)
        if other.indices != self.indices:
            raise ValueError(f"cannot merge lens indices {other.indices} into {self.indices}")
        for a, b in zip(self.groups(), other.groups()):
            a.merge(b)
        self.diff += other.diff.to(self.diff.device)
        self.count += other.count
        return self

    def _names(self) -> list[str]:
        n = range(len(self.indices))
        return [*(f"cross.m{j}.i{k}." for j in range(self.n_tuned) for k in n), *(f"self_base.i{k}." for k in n),
                *(f"self_tuned.m{j}.i{k}." for j in range(self.n_tuned) for k in n)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"config": torch.tensor([self.n_states, self.n_tuned, self.d, *self.indices], dtype=torch.int64),
              "diff": self.diff.cpu().clone(), "count": self.count.clone()}
        for name, acc in zip(self._names(), self.groups()):
            sd.update({f"{name}{k}": v for k, v in acc.state_dict().items()})
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mine = torch.tensor([self.n_states, self.n_tuned, self.d, *self.indices], dtype=torch.int64)
        if not torch.equal(state["config"].to(torch.int64), mine):
            raise ValueError(f"the saved lens state has (n_states, n_tuned, d, indices...) {state['config'].tolist()}, "
                             f"this run {mine.tolist()}")
        for name, acc in zip(self._names(), self.groups()):
            acc.load_state_dict({k.removeprefix(name): v for k, v in state.items() if k.startswith(name)})
        self.diff = state["diff"].to(torch.float64).clone()
        self.count = state["count"].to(torch.int64).clone()

    # ---- finalize -----------------------------------------------------------------------------------------------
    def finalize(self, j: int = 0, heads: LensHeads | None = None, decode: Callable[[int], str] | None = None,
                 top_k: int = 20) -> dict:
        """Tuned model j: {"lens": [{"index", **TokenMetrics.finalize()}], "self_lens": {"base": [...], "tuned":
        [...]}, "promoted": [{"index", "promoted": [...], "suppressed": [...]}] (with `heads`; else absent)}."""
        rows = lambda accs: [{"index": i, **acc.finalize()} for i, acc in zip(self.indices, accs)]
        out = {"lens": rows(self.cross[j]),
               "self_lens": {"base": rows(self.self_base), "tuned": rows(self.self_tuned[j])}}
        if heads is not None:
            out["promoted"] = self.promoted(j, heads, decode, top_k)
        return out

    def promoted(self, j: int, heads: LensHeads, decode: Callable[[int], str] | None, top_k: int) -> list[dict]:
        """Per chosen index, the top_k ids of s = W_base·(γ_base ⊙ Δμ_i) (γ omitted at L: its states are normed) and
        of −s, with their scores and (with `decode`) text."""
        last, out = self.n_states - 1, []
        for k, i in enumerate(self.indices):
            n = int(self.count[k])
            if n == 0:
                out.append({"index": i, "tokens": 0, "promoted": [], "suppressed": []})
                continue
            s = promoted_scores(heads.base.head, None if i == last else heads.base.gamma, self.diff[j, k] / n).cpu()
            kk = min(top_k, s.shape[0])
            side = lambda v: [{"id": t, "score": float(s[t]), **({"text": decode(t)} if decode else {})}
                              for t in torch.sort(v, descending=True, stable=True).indices[:kk].tolist()]
            out.append({"index": i, "tokens": n, "promoted": side(s), "suppressed": side(-s)})
        return out
