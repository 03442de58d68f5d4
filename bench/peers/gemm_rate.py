"""The machine's float32 GEMM rate now, as a peer run records it before and after each round: MKL sgemm
[4,096, 576] x [576, 3,072] (a drift forward's gate|up shape), the best of 10 calls after 3 warm-ups, in GFLOP/s, on
the threads OMP_NUM_THREADS gives. One JSON line. On a shared VM the rate can halve within minutes (bench/RESULTS.md,
2026-12-07 fifth session: 184-198 -> 90-111 GFLOP/s on 2 threads); a round whose rate moved is not comparable.

    python -m bench.peers.gemm_rate
"""
from __future__ import annotations

import json
import time

import torch


def rate(m: int = 4096, k: int = 576, n: int = 3072, calls: int = 10) -> float:
    x, w, out = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
    for _ in range(3):
        torch.matmul(x, w.T, out=out)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        torch.matmul(x, w.T, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


if __name__ == "__main__":
    print(json.dumps({"gflops": round(rate(), 1), "threads": torch.get_num_threads()}))
