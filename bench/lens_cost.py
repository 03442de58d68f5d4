"""The cost of `--lens every:4` on the CPU drift bench pair (bench/drift_workloads.py: tiny random Qwen3, L = 4,
d = 256, the real vocabulary V = 151,936, the first 3 MATH500 responses), against the head-GEMM floor, issue [15].

One process, interleaved rounds (order rotated each round): drift without lens, drift with lens="every:4", and the
floor: the extra head GEMMs the lens needs (probes/lens.py's count: every:4 on L = 4 chooses indices {0, 4}, n' = 1
below L; J = 1: (1 + J)·n' = 2 [N, d] x [d, V] GEMMs, each model's lens logits at index 0; the output logits are the
output probe's, which the plain drift computes too) as bare `torch.matmul(states, W.T, out=buf)` (F.linear without
bias, into one reused [256, V] fp32 buffer: no page faults counted) over the same N scored rows in 256-row panels;
where the probe's GEMMs run on oneDNN (kernels.linear.cpu_gemm) also those calls, [256, d] x [d, 16384] chunks, and
each round's floor is the faster engine's.
Both drifts: pca="none", report=False (their own noise is not the subject). OMP_NUM_THREADS is fixed before torch
imports; the load average is recorded per round. Prints one JSON line per round and a summary line.

`real` as third argument: the real pair of the drift peers instead (bench/peers: SmolLM2-135M-Instruct and its
1%-noise copy, d = 576, V = 49,152, 30 layers; 32 MATH500 responses cut to 256 tokens): every:4 chooses n' = 8
indices below L = 30, so the floor is 16 GEMMs. Build the pair first with `python -m bench.peers.weights 1`.

    python bench/lens_cost.py [ROUNDS] [THREADS] [real]
"""
from __future__ import annotations

import os
import sys

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
THREADS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
REAL = len(sys.argv) > 3 and sys.argv[3] == "real"
MAX_SEQ_LEN = 256 if REAL else None  # the drift peers' cut (bench/peers/workloads.py: DRIFT_MAX_TOKENS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from drift_workloads import write_pair  # noqa: E402

from driftscope import drift, load_tokenizer  # noqa: E402
from driftscope.engine.loader import load_model  # noqa: E402
from driftscope.kernels.linear import cpu_gemm, onednn_gemm  # noqa: E402
from driftscope.kernels.vocab_probe.cpp import _cpp_tile_sizes  # noqa: E402
from driftscope.records import load_samples  # noqa: E402

N_RECORDS, LENS = 3, "every:4"


def _drift(base: Path, tuned: Path, data: Path, lens: str | None) -> dict:
    t0 = time.perf_counter()
    s = drift(base, tuned, data, progress=False, max_batch_tokens=4096, pca="none", report=False, lens=lens,
              max_seq_len=MAX_SEQ_LEN).summary
    (model,) = s["models"].values()
    return {"seconds": time.perf_counter() - t0, "tokens": sum(t["tokens"] for t in model["tasks"].values()),
            "stages": s["timing"]["stages"], "lens_indices": [r["index"] for t in model["tasks"].values()
                                                             for r in t.get("lens") or []]}


def main() -> None:
    torch.set_num_threads(THREADS)
    if REAL:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from bench.peers import weights, workloads

        base, tuned, data = weights.base_hf(), weights.tuned_hf(1), workloads.drift_records()
    else:
        base, tuned, data = write_pair(Path(tempfile.mkdtemp(prefix="lens-cost-")), N_RECORDS)
    samples, _ = load_samples(data, load_tokenizer(base), max_seq_len=MAX_SEQ_LEN)
    n = sum(s.n_scored for s in samples)
    heads = [load_model(p).lm_head_weight.float().contiguous() for p in (base, tuned)]  # [V, d] each
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(n, heads[0].shape[1], generator=g) for _ in heads]
    tile, chunk = _cpp_tile_sizes(n, heads[0].shape[0])  # the probe's token tile and vocabulary chunk
    buf = torch.empty(tile, heads[0].shape[0])

    idx = _drift(base, tuned, data, LENS)["lens_indices"]  # warm-up: imports, first-call allocations, page cache
    per_head = sum(i != max(idx) for i in set(idx))  # the chosen indices below L: n' GEMMs per model

    def floor(engine: str) -> dict:
        t0 = time.perf_counter()
        for w, h in zip(heads, states):
            for _ in range(per_head):
                for r0 in range(0, n, tile):
                    t = min(tile, n - r0)
                    if engine == "mkl":
                        torch.matmul(h[r0:r0 + t], w.T, out=buf[:t])
                    else:  # the probe's own chunks (its oneDNN outputs are [tile, chunk] tensors)
                        for c0 in range(0, w.shape[0], chunk):
                            cpu_gemm(h[r0:r0 + t], w[c0:c0 + chunk])
        return {"seconds": time.perf_counter() - t0, "gemms": per_head * len(heads), "rows": n}

    ways = {"plain": lambda: _drift(base, tuned, data, None), "lens": lambda: _drift(base, tuned, data, LENS),
            "floor": lambda: floor("mkl")}
    if onednn_gemm():  # the probe's GEMMs run on oneDNN here: the floor is the faster of the two engines
        ways["floor_onednn"] = lambda: floor("onednn")
    results: dict[str, list[float]] = {k: [] for k in ways}
    names = list(ways)
    for r in range(ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            load = os.getloadavg()[0]
            out = ways[name]()
            results[name].append(out["seconds"])
            print(json.dumps({"round": r, "way": name, "load1": round(load, 2), **out}), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    extra = [lens - plain for lens, plain in zip(results["lens"], results["plain"])]
    floors = [min(f) for f in zip(*(results[k] for k in ways if k.startswith("floor")))]  # per round, best engine
    print(json.dumps({
        "summary": True, "median_seconds": med, "extra_per_round": extra, "floor_per_round": floors,
        "extra_over_floor_median": statistics.median(extra) / statistics.median(floors),
        "extra_over_floor_paired": statistics.median(e / f for e, f in zip(extra, floors)), "gemm": "onednn" if
        onednn_gemm() else "mkl", "rows": n, "threads": THREADS,
        "pair": "real" if REAL else "bench",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": f"{platform.processor() or platform.machine()}"
        f", {os.cpu_count()} cpus", "torch": torch.__version__, "load_end": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
