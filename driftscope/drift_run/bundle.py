"""The probes of one task: a `PairProbes` per tuned model (token metrics, llama.cpp's KLD statistics, shifted tokens,
paper-mode PCA), the hidden-state similarity and, in streaming mode, the PCA over the base states (both with the
base's sums once for every tuned model when they share the base states).

A bundle owns its accumulators' updates (`on_layer`, `on_vocab`), its checkpoint (`state_dict`, flat tensors)
and its summary (`finalize`): the run only routes batches to it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field as dc_field
from functools import partial

import torch

from driftscope.drift_run.summary import task_summary
from driftscope.kernels.cov_update import batch_gram
from driftscope.probes import HiddenSimilarity, KLDStats, PaperPCAShift, ShiftedTokens, StreamingPCA, TokenMetrics
from driftscope.probes.base import field
from driftscope.probes.examples import TopExamples
from driftscope.probes.lens import LensDrift, LensHeads
from driftscope.telemetry import StageTimes


@dataclass
class PairProbes:
    """The accumulators of one (tuned model, task)."""

    tokens: TokenMetrics
    shifted: ShiftedTokens
    paper_pca: PaperPCAShift | None = None
    kld: KLDStats = dc_field(default_factory=KLDStats)  # llama.cpp's --kl-divergence statistics
    examples: TopExamples | None = None  # the samples and tokens that moved most (--examples)

    def parts(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


_HEAD_CHUNK = 8192  # head rows converted to float64 at a time for the example stores' top-n (bounded copy)


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def _strip(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def merge_kind(key: str) -> str:
    """How a key of `TaskProbes.state_dict()` combines over processes that each ran part of the batches: "sum" (the
    float64/int64 sums and counts), "cat" (TokenMetrics' per-sample rows: each sample is in one process only;
    KLDStats' per-token values; TopExamples' stores, re-selected on load) or "first" (configurations, histogram edges,
    and paper-mode PCA, which one process computes for every batch)."""
    if ".paper_pca." in key or key.endswith("config") or ".edges." in key:
        return "first"
    cat = key.endswith(".sample_ids") or ".sample_sums." in key or ".kld.values." in key or ".examples." in key
    return "cat" if cat else "sum"


class TaskProbes:
    """Every probe of one task, for `n_tuned` tuned models.

    `shared_base=True` (lockstep over the records): every tuned model sees the same inputs, so the hidden-state
    similarity and the streaming PCA keep the base sums once and compute them once per batch. `shared_base=False`
    (generate mode): each tuned model generates its own tokens, so each has its own.
    `lens` (probes.lens.LensHeads, lockstep only): the models' norms and heads; with indices, the logit-lens drift
    there (on_layer keeps those states and the final ones until on_vocab has every tuned model's output result, then
    `LensDrift.update` runs). `examples` > 0 (needs `lens`, for the heads): per tuned model a TopExamples of that k,
    whose top-5 next tokens come from the final states kept by on_layer."""

    def __init__(self, n_tuned: int, n_states: int, hidden_size: int, *, vocab_rows: int, pca: str, cka: str,
                 cka_proj_dim: int, shared_base: bool = True, lens: LensHeads | None = None,
                 examples: int = 0, times: StageTimes | None = None) -> None:
        self.n_tuned, self.n_states, self.hidden_size, self.pca_mode = n_tuned, n_states, hidden_size, pca
        self.shared_base = shared_base
        used = lens is not None and (bool(lens.indices) or examples > 0)
        if used and (not shared_base or lens.n_states != n_states or len(lens.tuned) != n_tuned):
            raise ValueError(f"the logit lens and example stores need lockstep probes (shared_base=True, got "
                             f"{shared_base}) with {lens.n_states} states and {len(lens.tuned)} tuned models (got "
                             f"{n_states}, {n_tuned})")
        if examples and lens is None:
            raise ValueError("the example stores (examples > 0) need the models' heads: pass lens=LensHeads(...)")
        self.lens_heads = lens
        self.times = times  # the run's stage timer: the lens is its own stage ("lens"), not token_probes'
        self.lens = LensDrift(lens.indices, n_states, n_tuned, hidden_size) if lens and lens.indices else None
        self.keep_final = self.lens is not None or examples > 0  # on_layer keeps the batch's final states
        self._lens_states: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # this batch's, index -> states
        self._lens_outputs: dict[int, object] = {}  # this batch's output-probe results, tuned model -> result
        self._lens_results: dict | None = None  # this batch's lens results when outputs_from_lens computed them
        self.pairs = [PairProbes(
            tokens=TokenMetrics(), shifted=ShiftedTokens(vocab_rows),
            paper_pca=PaperPCAShift(n_states, hidden_size) if pca == "paper" else None,
            examples=TopExamples(examples) if examples else None,
        ) for _ in range(n_tuned)]
        hidden = lambda n: HiddenSimilarity(n_states, hidden_size, cka=cka, proj_dim=cka_proj_dim, n_tuned=n)
        self.hidden = [hidden(n_tuned)] if shared_base else [hidden(1) for _ in range(n_tuned)]
        self.pcas: list[StreamingPCA] = []
        if pca == "streaming":
            self.pcas = ([StreamingPCA(n_states, hidden_size, n_tuned)] if shared_base
                         else [StreamingPCA(n_states, hidden_size) for _ in range(n_tuned)])

    # ---- updates ------------------------------------------------------------------------------------------------
    def on_layer(self, layer: int, hb: torch.Tensor, hts: Sequence[torch.Tensor], j: int | None = None) -> None:
        """States [N, d] of the scored positions: of every tuned model (j None), or of tuned model j alone."""
        js = range(self.n_tuned) if j is None else [j]
        if len(hts) != len(js):
            raise ValueError(f"expected the states of {len(js)} tuned model(s), got {len(hts)}")
        if self.shared_base:
            if j is not None:
                raise ValueError("shared-base probes need the states of every tuned model at once")
            if self.keep_final and (layer == self.n_states - 1 or (self.lens and layer in self.lens.indices)):
                self._lens_states[layer] = (hb, list(hts))
            g = self._base_gram(hb)
            self.hidden[0].update(layer, hb, list(hts), base_gram=g)
            if self.pcas:
                self.pcas[0].update(layer, hb, list(hts), base_gram=g)
            return
        g = self._base_gram(hb)
        for jj, ht in zip(js, hts):
            self.hidden[jj].update(layer, hb, ht, base_gram=g)
            if self.pcas:
                self.pcas[jj].update(layer, hb, ht, base_gram=g)

    def _base_gram(self, hb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Σx, XᵀX of the batch's base states once when several probes keep them (full CKA, streaming PCA)."""
        if sum(h.cka == "full" for h in self.hidden) + len(self.pcas) < 2:
            return None
        return batch_gram(hb.detach())

    def on_vocab(self, j: int, result, targets: torch.Tensor, sample_ids: torch.Tensor,
                 first: torch.Tensor) -> None:
        """One vocab-probe result of tuned model j (a VocabProbeResult or a dict of its [N] fields)."""
        pair = self.pairs[j]
        pair.tokens.update(result, sample_ids, first)
        pair.kld.update(result)
        pair.shifted.update(targets, field(result, "rank_base"), field(result, "rank_tuned"))
        if pair.examples is not None:
            pair.examples.update(field(result, "kl_tb"), targets, sample_ids, partial(self._top_n, j))
        if self.keep_final:
            self._lens_outputs[j] = result
            if len(self._lens_outputs) == self.n_tuned:  # the batch's last tuned model: the lens, then drop its states
                outputs = [self._lens_outputs[jj] for jj in range(self.n_tuned)]
                states, self._lens_states, self._lens_outputs = self._lens_states, {}, {}
                results, self._lens_results = self._lens_results, None
                if self.lens is not None:
                    with self.times("lens") if self.times is not None else nullcontext():
                        self.lens.update(self.lens_heads, states, targets, sample_ids, first, outputs, results)

    def outputs_from_lens(self, targets: torch.Tensor) -> list | None:
        """With the lens on (and on_layer's states of this batch kept), every tuned model's output-probe result from
        the lens's own calls, whose output logits give both (the output probe then costs no GEMM beyond the
        lens's); the lens's results wait for on_vocab. None without the lens: the caller runs vocab_probe."""
        if self.lens is None or self.n_states - 1 not in self._lens_states:
            return None
        outputs, self._lens_results = self.lens.outputs_and_lens(self.lens_heads, self._lens_states, targets)
        return outputs

    def _top_n(self, j: int, rows: torch.Tensor, n: int = 5) -> tuple[torch.Tensor, ...]:
        """Both models' top-n next tokens and probabilities (float64 logits of their heads, the pair's valid vocab)
        at the batch's scored rows `rows`: (base ids, base p, tuned ids, tuned p), each [R, n]. float64, so that the
        stored float32 values do not depend on R or on how the rows were batched (a float32 GEMM's rounding does:
        a torchrun rank's rows gave other last bits than one process's)."""
        hb, hts = self._lens_states[self.n_states - 1]
        heads, vv = self.lens_heads, self.lens_heads.valid_vocab[j]
        out = []
        for h, w in ((hb, heads.base.head), (hts[j], heads.tuned[j].head)):
            x, w = h[rows.to(h.device)].double(), w[:vv]  # [R, d]: R <= k rows only
            z = torch.cat([x @ w[v:v + _HEAD_CHUNK].double().T for v in range(0, w.shape[0], _HEAD_CHUNK)], dim=1)
            p = torch.softmax(z, dim=-1)  # [R, V]
            top = torch.topk(p, min(n, p.shape[1]), dim=-1)
            out += [top.indices, top.values.float()]
        return tuple(out)

    def set_paper_vectors(self, vectors: Sequence[torch.Tensor]) -> None:
        """Paper mode: the query vectors [L+1, Q, d] of the base, then of each tuned model. Each pair's PCA is
        built whole, then swapped in: an interrupt never leaves half of it."""
        if len(vectors) != self.n_tuned + 1:
            raise ValueError(f"expected vectors of {self.n_tuned + 1} models, got {len(vectors)}")
        qids = list(range(vectors[0].shape[1]))
        for j, pair in enumerate(self.pairs):
            acc = PaperPCAShift(self.n_states, self.hidden_size)
            for layer in range(self.n_states):
                acc.update(layer, vectors[0][layer], vectors[j + 1][layer], qids)
            pair.paper_pca = acc

    # ---- results ------------------------------------------------------------------------------------------------
    def pca(self, j: int) -> dict | None:
        if self.pca_mode == "paper":
            return self.pairs[j].paper_pca.finalize()
        if self.pcas:
            return self.pcas[0].finalize(j) if self.shared_base else self.pcas[j].finalize()
        return None

    def finalize(self, j: int, decode: Callable[[int], str], top_tokens: int, problems: list[str]) -> dict:
        """Tuned model j's block of summary.json for this task."""
        pair = self.pairs[j]
        hidden = self.hidden[0].finalize(j) if self.shared_base else self.hidden[j].finalize()
        lens = None if self.lens is None else self.lens.finalize(j, self.lens_heads, decode, self.lens_heads.top_k)
        return task_summary(tokens=pair.tokens.finalize(), hidden=hidden,
                            shifted=pair.shifted.finalize(decode=decode, top_k=top_tokens), pca=self.pca(j),
                            problems=problems, llama_cpp=pair.kld.finalize(), lens=lens,
                            examples=None if pair.examples is None else pair.examples.finalize(decode))

    # ---- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for j, pair in enumerate(self.pairs):
            for kind, acc in pair.parts().items():
                sd.update(_prefixed(f"m{j}.{kind}.", acc.state_dict()))
        for i, acc in enumerate(self.hidden):
            sd.update(_prefixed(f"hidden{i}.", acc.state_dict()))
        for i, acc in enumerate(self.pcas):
            sd.update(_prefixed(f"pca{i}.", acc.state_dict()))
        if self.lens is not None:
            sd.update(_prefixed("lens.", self.lens.state_dict()))
        return sd

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for j, pair in enumerate(self.pairs):
            for kind, acc in pair.parts().items():
                part = _strip(f"m{j}.{kind}.", state)
                if not part:
                    raise ValueError(f"the saved state lacks tuned model {j}'s {kind}")
                acc.load_state_dict(part)
        for i, acc in enumerate(self.hidden):
            part = _strip(f"hidden{i}.", state)
            if not part:
                raise ValueError(f"the saved state lacks the hidden-state sums {i}")
            acc.load_state_dict(part)
        for i, acc in enumerate(self.pcas):
            acc.load_state_dict(_strip(f"pca{i}.", state))
        if self.lens is not None:
            part = _strip("lens.", state)
            if not part:
                raise ValueError("the saved state lacks the logit lens (was it run without --lens?)")
            self.lens.load_state_dict(part)
