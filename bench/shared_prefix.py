"""A drift with the samples' shared prefix run once per batch (`share_prefix=True`, the default) against the same
drift with every sample whole (`share_prefix=False`), on the drift peers' real pair and records (bench/peers:
SmolLM2-135M-Instruct and its 1%-noise copy, 32 MATH500 responses cut to 256 tokens; every record starts with the
same instruction). One process, interleaved rounds (order alternated), default probes, no report; OMP_NUM_THREADS is
fixed before torch imports, the load average recorded per round. Prints one JSON line per round and a summary line
with the median ratio of paired rounds and the largest relative difference of the summaries' means.
Build the pair first with `python -m bench.peers.weights 1`.

    python bench/shared_prefix.py [ROUNDS] [THREADS]
"""
from __future__ import annotations

import os
import sys

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
THREADS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.peers import weights, workloads  # noqa: E402
from driftscope import drift  # noqa: E402

MEANS = ("kl_tb", "kl_bt", "logp_base", "logp_tuned", "rank_shift_top", "entropy_base", "entropy_tuned")


def _drift(share: bool) -> dict:
    t0 = time.perf_counter()
    s = drift(weights.base_hf(), weights.tuned_hf(1), workloads.drift_records(), progress=False, report=False,
              max_seq_len=workloads.DRIFT_MAX_TOKENS, share_prefix=share).summary
    (model,) = s["models"].values()
    (task,) = model["tasks"].values()
    return {"seconds": time.perf_counter() - t0, "tokens": task["tokens"], "stages": s["timing"]["stages"],
            "means": {k: task[k]["token_mean"] for k in MEANS if isinstance(task.get(k), dict)}}


def main() -> None:
    torch.set_num_threads(THREADS)
    _drift(True)  # warm-up: imports, page cache
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(ROUNDS):
        for share in ((True, False) if r % 2 == 0 else (False, True)):
            load = os.getloadavg()[0]
            out = _drift(share)
            runs[share].append(out)
            print(json.dumps({"round": r, "share_prefix": share, "load1": round(load, 2), **out}), flush=True)
    ratio = [b["seconds"] / a["seconds"] for a, b in zip(runs[True], runs[False])]
    fwd = [b["stages"]["forward"] / a["stages"]["forward"] for a, b in zip(runs[True], runs[False])]
    a, b = runs[True][0]["means"], runs[False][0]["means"]
    print(json.dumps({
        "summary": True, "speedup_median": statistics.median(ratio), "speedup_min_max": [min(ratio), max(ratio)],
        "forward_speedup_median": statistics.median(fwd),
        "seconds_median": {"shared": statistics.median(x["seconds"] for x in runs[True]),
                           "whole": statistics.median(x["seconds"] for x in runs[False])},
        "max_rel_diff_of_means": max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in b),
        "threads": THREADS, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__, "load_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
