"""Fused vocabulary probe: exact per-token KL (both directions), log-probs, ranks, argmaxes, the base rank of
the tuned top-1, entropies and log-sum-exps of a base and a tuned LM head, without an [N, V] logits tensor.

Contract: `vocab_probe(h_base, w_base, h_tuned, w_tuned, targets=None, *, valid_vocab=None)` returns a
`VocabProbeResult` of [N] tensors (definitions on the class; target metrics None without targets).
`kernels._dispatch.select` picks the backend per call (CUDA tensors -> triton, CPU -> cpp, torch last;
DRIFTSCOPE_BACKEND or `use_backend` force one): `triton_fused` (fused Triton kernel), `cpp` (torch GEMM +
driftscope._C fold) and `reference` (`vocab_probe_torch`, the fp32 reference). `common` holds the type, the
input checks and the recount merge shared by the fused backends; README: Architecture.
"""
from __future__ import annotations

import torch

from driftscope.kernels._dispatch import select
from driftscope.kernels.vocab_probe.common import VocabProbeResult, _check_inputs, _empty_result
from driftscope.kernels.vocab_probe.cpp import _cpp_tile_sizes, _vocab_probe_cpp
from driftscope.kernels.vocab_probe.reference import vocab_probe_torch
from driftscope.kernels.vocab_probe.triton_fused import PACKED_FIELDS, PACKED_INT_FIELDS, _vocab_probe_triton

__all__ = [
    "vocab_probe",
    "vocab_probe_torch",
    "VocabProbeResult",
    # backend entry points and helpers that tests and benches call directly
    "PACKED_FIELDS",
    "PACKED_INT_FIELDS",
    "_check_inputs",
    "_cpp_tile_sizes",
    "_empty_result",
    "_vocab_probe_cpp",
    "_vocab_probe_triton",
]


def vocab_probe(
    h_base: torch.Tensor,
    w_base: torch.Tensor,
    h_tuned: torch.Tensor,
    w_tuned: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    valid_vocab: int | None = None,
) -> VocabProbeResult:
    """Exact per-token vocabulary metrics of a base and a tuned LM head, without [N, V] logits.

    h_*: [N, d_*] final normed hidden states; w_*: [V_*, d_*] LM-head rows (float32/bfloat16/float16);
    targets: [N] int64/int32 next-token ids or None (target metrics are then None). valid_vocab: the
    tokenizer's vocabulary size when the heads are padded (rows beyond it are never produced);
    required when the heads' row counts differ. The backend comes from kernels._dispatch.select.
    """
    w_base, w_tuned, targets, _ = _check_inputs(h_base, w_base, h_tuned, w_tuned, targets, valid_vocab)
    backend = select(h_base.device, ("triton", "cpp", "torch"))
    if h_base.shape[0] == 0:
        return _empty_result(0, h_base.device, targets is not None)
    if backend == "triton":
        return _vocab_probe_triton(h_base, w_base, h_tuned, w_tuned, targets)
    if backend == "cpp":
        return _vocab_probe_cpp(h_base, w_base, h_tuned, w_tuned, targets)
    return vocab_probe_torch(h_base, w_base, h_tuned, w_tuned, targets)
