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
from driftscope.kernels.vocab_probe.cpp import vocab_probe_cpp
from driftscope.kernels.vocab_probe.reference import vocab_probe_torch
from driftscope.kernels.vocab_probe.triton_fused import vocab_probe_fused
from driftscope.kernels.vocab_probe.triton_panel import path_status, vocab_probe_panel, vocab_probe_triton

__all__ = ["vocab_probe", "vocab_probe_torch", "VocabProbeResult", "FLAGGED", "VOCAB_PROBE",
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
    checked = []
    for j, (h, w) in enumerate(pairs):
        try:
            checked.append(_check_inputs(h_base, w_base, h, w, targets, valid_vocab))
        except ValueError as e:
            raise ValueError(f"tuned model {j}: {e}" if many else str(e)) from None
    _check_finite_head("w_base", w_base, checked[0][3])
    for j, (_, w) in enumerate(pairs):
        _check_finite_head(f"w_tuned[{j}]" if many else "w_tuned", w, checked[0][3])
    w_base, targets = checked[0][0], checked[0][2]
    hts, wts = [h for h, _ in pairs], [c[1] for c in checked]
    bad = [~torch.isfinite(h).all(1) for h in (h_base, *hts)]  # [N] each: rows with NaN/Inf, one reduction each
    if bool(torch.stack(bad).any()):  # zeroed for the backends (a NaN row must not reach a kernel)
        h_base, *hts = [h.masked_fill(b[:, None], 0) for h, b in zip((h_base, *hts), bad)]
    backend = VOCAB_PROBE.select(h_base.device)
    if h_base.shape[0] == 0:
        out = [_empty_result(0, h_base.device, targets is not None) for _ in pairs]
    else:
        out = VOCAB_PROBE.impls[backend](h_base, w_base, hts, wts, targets)
    out = [_flag_rows(r, bad[0] | b) for r, b in zip(out, bad[1:])]
    return out if many else out[0]
