"""The cpp vocab probe against the materialized way while other processes keep every core busy (issue [13]).

    python -m bench.vocab_contention [--rounds 3] [--threads 2] [--n 512] [--burners CORES]

Workload and both ways are bench/test_bench_vocab_probe.py's (d = 1024, V = 151,936, float32, fused cpp vs full
[N, V] logits + log_softmax + KL + ranks). Each OpenMP wait policy runs in its own process (the runtime reads it
once, at load): PASSIVE, which the CLI sets (cli.passive_openmp), and the runtime's default (spin, then sleep).
`--burners` busy-loop processes (default: one per core) run for the whole measurement, so every core the probe's
threads use is shared. Rounds interleave the two ways (A B, B A, ...) after one warm-up of each; printed per round
and as the median of the paired ratios materialized / fused (> 1: the fused probe is faster). `--burners 0`: the
quiet baseline of the same script.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time


def _burn() -> None:
    while True:
        pass


def child(rounds: int, n: int) -> dict:
    import torch

    from bench.test_bench_vocab_probe import D, V, fused_cpp, make_inputs, materialized

    args = make_inputs(n, D, V)
    ways = {"fused_cpp": fused_cpp, "materialized": materialized}
    for f in ways.values():
        f(*args)
    out: dict = {"threads": torch.get_num_threads(), "rounds": []}
    for r in range(rounds):
        order = list(ways) if r % 2 == 0 else list(ways)[::-1]
        row = {"load1": os.getloadavg()[0]}
        for name in order:
            t0 = time.perf_counter()
            ways[name](*args)
            row[name] = time.perf_counter() - t0
        out["rounds"].append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--burners", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.rounds, a.n)))
        return
    burners = [mp.Process(target=_burn, daemon=True) for _ in range(a.burners)]
    for p in burners:
        p.start()
    try:
        for policy in ("PASSIVE", None):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            if policy:
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, "-m", "bench.vocab_contention", "--child", "--rounds", str(a.rounds), "--n",
                   str(a.n)]
            res = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
            ratios = [r["materialized"] / r["fused_cpp"] for r in res["rounds"]]
            for r in res["rounds"]:
                print(f"policy={policy or 'default'} burners={a.burners} threads={res['threads']} "
                      f"load1={r['load1']:.2f} fused_cpp={r['fused_cpp']:.2f}s materialized={r['materialized']:.2f}s"
                      f" ratio={r['materialized'] / r['fused_cpp']:.2f}")
            print(f"policy={policy or 'default'}: materialized / fused median {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)
    finally:
        for p in burners:
            p.terminate()


if __name__ == "__main__":
    main()
