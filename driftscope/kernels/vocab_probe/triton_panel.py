"""triton backend: `vocab_probe_triton` picks the path with `vocab_path`, the rule in this one place: the panel path
here (per panel of token rows, the full-vocabulary fp32 logits of the base model from one cuBLAS GEMM shared by all
J tuned models and of each tuned model into one reused buffer, folded by `triton_fold`; memory O(rows × V)) or the
fused kernel (`triton_fused`, one launch per pair, least memory)."""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from driftscope.kernels._dispatch import Availability
from driftscope.kernels.vocab_probe import triton_fold
from driftscope.kernels.vocab_probe.common import VocabProbeResult
from driftscope.kernels.vocab_probe.triton_fused import vocab_probe_fused

VOCAB_PATHS = ("panel", "fused")
PANEL_MAX_BYTES = 2 << 30  # both fp32 panels (base + one tuned) together
PANEL_FREE_FRACTION = 0.25  # ... and at most this share of the device's free memory
PANEL_MIN_ROWS = 64  # below this the GEMMs are too thin to pay: fused instead
PANEL_ROW_MULTIPLE = 128  # panels rounded to whole cuBLAS row tiles where the budget allows
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


def vocab_probe_panel(h_base: torch.Tensor, w_base: torch.Tensor, h_tuned: list[torch.Tensor],
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


def vocab_probe_triton(h_base: torch.Tensor, w_base: torch.Tensor, h_tuned: list[torch.Tensor],
                       w_tuned: list[torch.Tensor], targets: torch.Tensor | None) -> list[VocabProbeResult]:
    """The triton backend: the panel path (all J pairs, the base GEMM shared) or one fused launch per pair."""
    path = vocab_path(h_base.device, h_base.shape[0], w_base.shape[0])
    if path.path == "panel":
        return vocab_probe_panel(h_base, w_base, h_tuned, w_tuned, targets, path.rows)
    return [vocab_probe_fused(h_base, w_base, h, w, targets) for h, w in zip(h_tuned, w_tuned)]


@dataclass(frozen=True)
class VocabPath:
    path: str  # "panel" | "fused"
    rows: int  # token rows per panel (0 for fused)
    reason: str


def panel_bytes(rows: int, vocab: int) -> int:
    """Memory of the panel path's buffers: two fp32 [rows, V] panels (the base one and one reused tuned one)."""
    return 2 * rows * vocab * 4


@functools.cache
def mm_out_dtype_status() -> Availability:
    """Whether torch.mm takes out_dtype=float32 (bf16/fp16 GEMMs with fp32 output, torch >= 2.8): the panel path
    needs it on CUDA. Probed on the meta device, so it answers on CPU-only machines too."""
    a = torch.empty(2, 2, dtype=torch.bfloat16, device="meta")
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        return Availability(False, f"torch {torch.__version__} has no torch.mm(out_dtype=float32) ({exc})"[:200])
    return Availability(True, "torch.mm(out_dtype=float32)")


def vocab_path(device: torch.device | str, n: int, vocab: int) -> VocabPath:
    """The triton backend's vocab_probe path for N tokens over a V-word vocabulary.

    Rule: panel when two fp32 [rows, V] panels with rows >= min(N, PANEL_MIN_ROWS) fit the budget
    min(PANEL_MAX_BYTES, PANEL_FREE_FRACTION · free CUDA memory) (PANEL_MAX_BYTES off CUDA) and, on CUDA,
    torch.mm has out_dtype; else fused. DRIFTSCOPE_VOCAB_PATH=panel|fused forces one (a forced panel takes
    at least PANEL_MIN_ROWS rows; without out_dtype on CUDA it raises).
    Rows: the most that fit, spread evenly over the panels and rounded up to PANEL_ROW_MULTIPLE when that
    still fits (paper shape, 2 GiB: 1766 fit, 10 panels of 1664 rows, 1.9 GiB). The constants and the
    predicted times behind them: bench/RESULTS.md, "GPU predictions of the vocab_probe path rule"."""
    forced = os.environ.get("DRIFTSCOPE_VOCAB_PATH", "").strip()
    if forced and forced not in VOCAB_PATHS:
        raise ValueError(f"DRIFTSCOPE_VOCAB_PATH={forced!r} is not a vocab path; expected one of "
                         f"{', '.join(VOCAB_PATHS)}")
    device = torch.device(device)
    # only CUDA needs the probe (off CUDA its meta-device mm imported torch's symbolic shapes and sympy: ~1 s)
    mm = mm_out_dtype_status() if device.type == "cuda" else None
    if device.type == "cuda" and not mm and forced != "fused":
        if forced:
            raise RuntimeError(f"DRIFTSCOPE_VOCAB_PATH=panel is forced but unavailable: {mm.reason}")
        return VocabPath("fused", 0, f"fused kernel: the panel path needs {mm.reason}")
    budget, where = PANEL_MAX_BYTES, f"{PANEL_MAX_BYTES / 2**30:.1f} GiB"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
            - torch.cuda.memory_allocated(device)  # free on the device + cached by torch's allocator
        budget = min(budget, int(PANEL_FREE_FRACTION * free))
        where = f"{budget / 2**30:.2f} GiB (min of {PANEL_MAX_BYTES / 2**30:.1f} GiB, {PANEL_FREE_FRACTION:g} of " \
                f"{free / 2**30:.1f} GiB free)"
    fit, need = budget // panel_bytes(1, vocab), min(n, PANEL_MIN_ROWS)
    if forced == "fused" or (not forced and fit < need):
        why = "DRIFTSCOPE_VOCAB_PATH=fused" if forced else f"{need} rows of V={vocab} do not fit the budget {where}"
        return VocabPath("fused", 0, f"fused kernel: {why}")
    fit = max(fit, need)
    per = -(-n // max(1, -(-n // fit)))  # even panels
    rounded = -(-per // PANEL_ROW_MULTIPLE) * PANEL_ROW_MULTIPLE
    rows = min(n, rounded if rounded <= fit else per)
    why = "DRIFTSCOPE_VOCAB_PATH=panel" if forced else f"two fp32 [rows, V] panels fit the budget {where}"
    return VocabPath("panel", rows, f"panel: {why}; {rows} rows x V={vocab} = "
                                    f"{panel_bytes(rows, vocab) / 2**20:.1f} MiB")


def path_status() -> dict[str, object]:
    """What backend_status says of the rule: the path at the paper's shape on this machine's device."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vp = vocab_path(dev, 16384, 151_936)
    return {"vocab_path": {"path": vp.path, "rows": vp.rows,
                           "reason": f"triton at N=16384, V=151,936 on {dev}: {vp.reason}"}}
