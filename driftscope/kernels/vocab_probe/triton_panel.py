"""Triton backend, panel path: per panel of token rows, the full-vocabulary fp32 logits of the base model from one
cuBLAS GEMM (shared by all J tuned models) and of each tuned model into one reused buffer, folded by
`triton_fold`. Memory O(rows × V); `_dispatch.vocab_path` chooses it (or the fused kernel) and the rows."""
from __future__ import annotations

from collections.abc import Callable

import torch

from driftscope.kernels.vocab_probe import triton_fold
from driftscope.kernels.vocab_probe.common import VocabProbeResult

_LD_MULTIPLE = 64  # panel rows 256-byte aligned, ld divisible by 16: the fold's loads vectorize (16-byte)


def _gemm(h: torch.Tensor, w: torch.Tensor) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
    """(r0, r1, out) -> out = z[r0:r1] = h[r0:r1]·wᵀ in fp32, out a [r1 − r0, V] fp32 view.

    bf16/fp16 pairs on CUDA: cuBLAS with fp32 output (torch.mm(out_dtype=float32); fp32 accumulation, no
    rounding of the logits to 16 bits). fp32 and mixed pairs, and CPU tensors (torch.mm has no out_dtype on
    CPU): an fp32 GEMM of the upcast operands, each upcast once per call (bf16 -> fp32 is exact); on CUDA it
    follows torch's TF32 setting (off by default)."""
    if h.device.type == "cuda" and h.dtype == w.dtype and h.dtype in (torch.bfloat16, torch.float16):
        return lambda r0, r1, out: torch.mm(h[r0:r1], w.T, out_dtype=torch.float32, out=out)
    hf, wf = h.float(), w.float()
    return lambda r0, r1, out: torch.mm(hf[r0:r1], wf.T, out=out)


def _vocab_probe_panel(h_base: torch.Tensor, w_base: torch.Tensor, h_tuned: list[torch.Tensor],
                       w_tuned: list[torch.Tensor], targets: torch.Tensor | None, rows: int,
                       block_v: int | None = None) -> list[VocabProbeResult]:
    """The J pairs (h_base, w_base) × (h_tuned[j], w_tuned[j]), validated and cut to the vocabulary (w_*:
    [V, d_*]), in panels of `rows` token rows: per panel one base GEMM, then per tuned model its GEMM and one
    fold launch. Extra memory: two fp32 [rows, ld] panels (ld = V rounded up to 64) plus the [13, N] outputs
    per pair (and fp32 copies of the operands of fp32/mixed/CPU pairs). Each result equals its single-pair
    call bit for bit: the same GEMM calls on the same panels."""
    n, vocab = h_base.shape[0], w_base.shape[0]
    assert rows >= 1 and len(h_tuned) == len(w_tuned) >= 1
    dev = h_base.device
    ld = -(-vocab // _LD_MULTIPLE) * _LD_MULTIPLE
    rows = min(rows, n)
    zb_buf = torch.full((rows * ld,), float("-inf"), dtype=torch.float32, device=dev)  # columns V .. ld stay -inf
    zt_buf = torch.full((rows * ld,), float("-inf"), dtype=torch.float32, device=dev)
    gemm_b = _gemm(h_base, w_base)
    gemm_t = [_gemm(h, w) for h, w in zip(h_tuned, w_tuned)]
    outs = [(torch.full((len(triton_fold.FOLD_FIELDS), n), float("nan"), dtype=torch.float32, device=dev),
             torch.full((len(triton_fold.FOLD_INT_FIELDS), n), -7, dtype=torch.int64, device=dev)) for _ in gemm_t]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        zb = gemm_b(r0, r1, zb_buf[: (r1 - r0) * ld].view(r1 - r0, ld)[:, :vocab])  # [r1 - r0, V]
        tgt = None if targets is None else targets[r0:r1]
        for gemm, (outf, outi) in zip(gemm_t, outs):
            zt = gemm(r0, r1, zt_buf[: (r1 - r0) * ld].view(r1 - r0, ld)[:, :vocab])
            triton_fold._fold_panel(zb, zt, tgt, r0, outf, outi, block_v)
    has_t = targets is not None
    results = []
    for outf, outi in outs:
        got = {**dict(zip(triton_fold.FOLD_FIELDS, outf)), **dict(zip(triton_fold.FOLD_INT_FIELDS, outi))}
        if not has_t:
            got.update(logp_base=None, logp_tuned=None, rank_base=None, rank_tuned=None)
        results.append(VocabProbeResult(**got))
    return results
