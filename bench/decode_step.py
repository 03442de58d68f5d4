"""One decode step's kernel sequence at SmolLM2-135M's shapes, alone: 30 layers of (RMSNorm, q|k|v GEMM, paged
attention over a context of 200, o GEMM, RMSNorm, gate|up GEMM, SiLU·up, down GEMM) and the LM head, 16 sequences,
random weights, the model's Python between the calls. Prints the median and min of 40 steps (after 5 warm-up steps)
in milliseconds: run it in alternating processes against another build (see bench/before_after.py's `build`), with
the same OMP_NUM_THREADS / OMP_WAIT_POLICY / DRIFTSCOPE_SPIN_US, quiet or beside a busy-loop process.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python bench/decode_step.py [LABEL]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import driftscope
from driftscope.kernels.linear import linear
from driftscope.kernels.paged_attention import paged_decode_attention

LAYERS, D_MODEL, INTER, VOCAB, SEQS = 30, 576, 1536, 49152, 16
HQ, HKV, HEAD_DIM, BLOCK, CONTEXT = 9, 3, 64, 16, 200


def main() -> None:
    torch.manual_seed(0)
    d, inter = D_MODEL, INTER
    layers = [dict(qkv=torch.randn(960, d) * .02, o=torch.randn(d, d) * .02, gu=torch.randn(2 * inter, d) * .02,
                   down=torch.randn(d, inter) * .02) for _ in range(LAYERS)]
    head = torch.randn(VOCAB, d) * .02
    per_seq = -(-CONTEXT // BLOCK)
    slots = SEQS * per_seq * BLOCK
    kc = [torch.randn(slots, HKV, HEAD_DIM) for _ in range(LAYERS)]
    vc = [torch.randn(slots, HKV, HEAD_DIM) for _ in range(LAYERS)]
    ctx = torch.full((SEQS,), CONTEXT, dtype=torch.int32)
    tables = torch.arange(SEQS * per_seq).view(SEQS, per_seq).int()
    pos = torch.arange(CONTEXT)
    gather = tables.long().gather(1, (pos // BLOCK).expand(SEQS, -1)) * BLOCK + pos % BLOCK  # [SEQS, CONTEXT]
    mask = pos[None, :] < ctx[:, None]
    norm_w = torch.ones(d)

    def norm(h: torch.Tensor) -> torch.Tensor:
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w

    def step(h: torch.Tensor) -> torch.Tensor:
        for w, k, v in zip(layers, kc, vc):
            q = linear(norm(h), w["qkv"])[:, : HQ * HEAD_DIM].reshape(SEQS, HQ, HEAD_DIM).contiguous()
            o = paged_decode_attention(q, k, v, gather, mask, tables, ctx, BLOCK, HEAD_DIM**-0.5, None)
            h = h + linear(o.reshape(SEQS, d), w["o"])
            gu = linear(norm(h), w["gu"])
            h = h + linear(F.silu(gu[:, :inter]) * gu[:, inter:], w["down"])
        return linear(h, head).argmax(-1)

    h = torch.randn(SEQS, d)
    for _ in range(5):
        step(h)
    times = []
    for _ in range(40):
        t0 = time.perf_counter()
        step(h)
        times.append(time.perf_counter() - t0)
    label = sys.argv[1] if len(sys.argv) > 1 else "decode step"
    print(f"{label}: {statistics.median(times) * 1e3:.2f} ms (min {min(times) * 1e3:.2f}), {driftscope.__file__}")


if __name__ == "__main__":
    main()
