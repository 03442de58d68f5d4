"""Fused vocabulary probe: exact per-token KL (both directions), log-probs, ranks, argmaxes, the base rank of
the tuned top-1, entropies and log-sum-exps of a base and a tuned LM head, without an [N, V] logits tensor.

Contract: `vocab_probe(h_base, w_base, h_tuned, w_tuned, targets=None, *, valid_vocab=None)` returns a
`VocabProbeResult` of [N] tensors (definitions on the class; target metrics None without targets).
Backends, the table VOCAB_PROBE (kernels._dispatch picks one per call; DRIFTSCOPE_BACKEND or `use_backend` force
one): triton (`triton_panel.vocab_probe_triton`: its `vocab_path` rule picks the panel path, cuBLAS GEMMs into
fp32 panels + the `triton_fold` kernel, or `triton_fused`, one fused kernel), `cpp` (torch GEMM + driftscope._C
fold) and torch (`reference.vocab_probe_torch`, the fp32 reference). `common` holds the type, the input checks,
the flagged rows and the recount merge shared by the fused backends; README: Architecture.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from driftscope.kernels._dispatch import Op
from driftscope.kernels.vocab_probe.common import (FLAGGED, VocabProbeResult, _check_finite_head, _check_inputs,
                                                   _empty_result, _flag_rows)
from driftscope.kernels.vocab_probe.cpp import vocab_probe_cpp, vocab_probe_cpp_pairs
from driftscope.kernels.vocab_probe.reference import vocab_probe_torch
from driftscope.kernels.vocab_probe.triton_fused import vocab_probe_fused
from driftscope.kernels.vocab_probe.triton_panel import path_status, vocab_probe_panel, vocab_probe_triton

__all__ = ["vocab_probe", "vocab_probe_pairs", "vocab_probe_torch", "VocabProbeResult", "FLAGGED", "VOCAB_PROBE",
           "vocab_probe_cpp", "vocab_probe_fused", "vocab_probe_panel", "vocab_probe_triton"]  # backends, for tests

# every backend: (h_base, w_base, h_tuned list, w_tuned list, targets) -> a list of results, inputs validated
VOCAB_PROBE = Op("vocab_probe", {"triton": vocab_probe_triton, "cpp": vocab_probe_cpp, "torch": vocab_probe_torch},
                 details=path_status)


def vocab_probe(
    h_base: torch.Tensor,
    w_base: torch.Tensor,
    h_tuned: torch.Tensor | Sequence[torch.Tensor],
    w_tuned: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor | None = None,
    *,
    valid_vocab: int | None = None,
) -> VocabProbeResult | list[VocabProbeResult]:
    """Exact per-token vocabulary metrics of a base and a tuned LM head, without [N, V] logits.

    h_*: [N, d_*] final normed hidden states; w_*: [V_*, d_*] LM-head rows (float32/bfloat16/float16);
    targets: [N] int64/int32 next-token ids or None (target metrics are then None). valid_vocab: the
    tokenizer's vocabulary size when the heads are padded (rows beyond it are never produced);
    required when the heads' row counts differ. The backend comes from VOCAB_PROBE.select.
    h_tuned and w_tuned may be sequences of J tuned states and heads: then a list of J results, each equal
    to its single-pair call, with the base work (its GEMM, prologue) done once (cpp, torch, triton panel).
    A row with NaN/Inf in h_base or h_tuned (or overflowed logits) is flagged, not computed: its floats NaN, its
    ints FLAGGED (-1); the other rows are what they would be without it. NaN/Inf in a head's vocabulary rows:
    ValueError naming the head.
    """
    many = isinstance(h_tuned, (list, tuple)) or isinstance(w_tuned, (list, tuple))
    if many and not (isinstance(h_tuned, (list, tuple)) and isinstance(w_tuned, (list, tuple))
                     and len(h_tuned) == len(w_tuned) and len(h_tuned) > 0):
        raise ValueError("h_tuned and w_tuned must both be tensors, or sequences of the same nonzero length "
                         f"(got {type(h_tuned).__name__} and {type(w_tuned).__name__})")
    pairs = list(zip(h_tuned, w_tuned)) if many else [(h_tuned, w_tuned)]
    out = _probe([(h_base, w_base), *pairs], [(0, j + 1) for j in range(len(pairs))], targets, valid_vocab,
                 lambda p: f"tuned model {p}: " if many else "",
                 lambda s: "w_base" if s == 0 else f"w_tuned[{s - 1}]" if many else "w_tuned")
    return out if many else out[0]


def vocab_probe_pairs(sources: Sequence[tuple[torch.Tensor, torch.Tensor]], pairs: Sequence[tuple[int, int]],
                      targets: torch.Tensor | None = None, *, valid_vocab: int | None = None) -> list[VocabProbeResult]:
    """Several pairs over shared sources: `sources[s]` = (h [N, d], w [V, d]), `pairs` (a, b) = (base side, tuned
    side); one result per pair, each equal to `vocab_probe(*sources[a], *sources[b], targets, valid_vocab=...)` (bit
    for bit on cpp and torch). cpp computes each source's logits once per tile and chunk whatever the number of
    pairs reading them (the logit lens: 2 GEMMs per model and index instead of 4); the other backends run one
    J-tuned call per base side."""
    bad = [p for p in pairs if len(p) != 2 or not all(isinstance(s, int) and 0 <= s < len(sources) for s in p)]
    if not pairs or bad:
        raise ValueError(f"pairs must be a nonempty list of (a, b) indices into the {len(sources)} sources, got "
                         f"{bad[0] if bad else 'none'}")
    used = [s for s in sorted({s for p in pairs for s in p}) if torch.is_tensor(sources[s][0])]
    for s in used:  # a pair's own checks compare its two sides only
        (h0, _), (h, _) = sources[used[0]], sources[s]
        if (h.shape[0], h.device) != (h0.shape[0], h0.device):
            raise ValueError(f"sources[{s}] has {h.shape[0]} tokens on {h.device}, sources[{used[0]}] {h0.shape[0]} "
                             f"on {h0.device}: every source's states must have the same tokens and device")
    return _probe(list(sources), [tuple(p) for p in pairs], targets, valid_vocab, lambda p: f"pair {p}: ",
                  lambda s: f"sources[{s}] head")


def _probe(sources, pairs, targets, valid_vocab, pair_name, head_name) -> list[VocabProbeResult]:
    """The checks, the flagged rows and the backend call of vocab_probe and vocab_probe_pairs."""
    checked = []
    for p, (a, b) in enumerate(pairs):
        try:
            checked.append(_check_inputs(*sources[a], *sources[b], targets, valid_vocab))
        except ValueError as e:
            raise ValueError(f"{pair_name(p)}{e}") from None
    for p, c in enumerate(checked):
        if c[3] != checked[0][3]:
            raise ValueError(f"{pair_name(p)}its vocabulary has {c[3]} ids, pair 0's {checked[0][3]}: one call's "
                             "pairs share one vocabulary")
    used = sorted({s for p in pairs for s in p})
    ws, targets, vocab = [w for _, w in sources], checked[0][2], checked[0][3]
    for s in used:
        _check_finite_head(head_name(s), ws[s], vocab)
        ws[s] = ws[s][:vocab]
    hs = [h for h, _ in sources]
    bad = {s: ~torch.isfinite(hs[s]).all(1) for s in used}  # [N] each: rows with NaN/Inf, one reduction each
    if bool(torch.stack(list(bad.values())).any()):  # zeroed for the backends (a NaN row must not reach a kernel)
        hs = [h.masked_fill(bad[s][:, None], 0) if s in bad else h for s, h in enumerate(hs)]
    device = hs[pairs[0][0]].device
    backend = VOCAB_PROBE.select(device)
    if hs[pairs[0][0]].shape[0] == 0:
        out = [_empty_result(0, device, targets is not None) for _ in pairs]
    elif backend == "cpp":
        out = vocab_probe_cpp_pairs(hs, ws, pairs, targets)
    else:  # one J-tuned call per base side
        res: dict[int, VocabProbeResult] = {}
        for a in dict.fromkeys(a for a, _ in pairs):
            ps = [p for p, (x, _) in enumerate(pairs) if x == a]
            got = VOCAB_PROBE.impls[backend](hs[a], ws[a], [hs[pairs[p][1]] for p in ps],
                                             [ws[pairs[p][1]] for p in ps], targets)
            res.update(zip(ps, got))
        out = [res[p] for p in range(len(pairs))]
    return [_flag_rows(r, bad[a] | bad[b]) for r, (a, b) in zip(out, pairs)]
