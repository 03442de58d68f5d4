"""Layer streaming (--stream-layers) vs the in-memory drift run: time, and peak host memory from a fresh process.

Checkpoint: a random Qwen3 pair, hidden 512, 16 layers, intermediate 2048, vocab 32,000, tied head, float32
(319 MiB each; the decoder layers ≈ 80% of it). Memory = VmHWM (/proc/self/status) minus the RSS after imports:
`peak_extra_mb` over the whole run (load included: the in-memory load maps each file while it copies it), and
`run_peak_extra_mb` from just after the load (the high-water mark reset then). Streaming keeps the embeddings resident
and two layers per model. On the CPU the "device" is host memory, so this shows the bound of the mode, not a GPU's.
Usage as a script: python bench/test_bench_stream.py {memory,stream} BASE TUNED DATA -> one JSON line.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

GROUP = "drift-layer-streaming"
SHAPE = dict(vocab_size=32000, hidden_size=512, num_layers=16, num_heads=8, num_kv_heads=8, head_dim=64,
             intermediate_size=2048, tie=True)
OPTS = dict(progress=False, max_batch_tokens=512, pca="streaming", cka="full")
SENTENCES = ["The committee postponed the vote until every member had read the final report.",
             "A geometric series with ratio one half starting at one converges to two.",
             "Rivers carry sediment downstream and deposit it where the water slows near the coast."]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _measure(mode: str, base: str, tuned: str, data: str) -> dict:
    """One drift run in this (fresh) process; the high-water mark is reset when the models are loaded."""
    import driftscope.drift_run.run as run_mod
    from driftscope import drift

    start = _status_mb("VmRSS")
    marks = {}
    runner_cls = run_mod.LockstepRunner

    def after_load(*args, **kw):  # _Run builds the runner right after loading the models
        marks["load_peak"] = _status_mb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        marks["after_load"] = _status_mb("VmRSS")
        return runner_cls(*args, **kw)

    run_mod.LockstepRunner = after_load
    summary = drift(base, tuned, data, stream_layers=mode == "stream", **OPTS).summary
    run_peak = _status_mb("VmHWM")
    return {"peak_extra_mb": max(marks["load_peak"], run_peak) - start, "run_peak_extra_mb": run_peak - start,
            "resident_after_load_mb": marks["after_load"] - start,
            "kl_tb": summary["models"]["tuned"]["tasks"]["records"]["kl_tb"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from driftscope.testing import random_checkpoint, write_tokenizer

    root = tmp_path_factory.mktemp("bench-stream")
    for name, seed in (("base", 0), ("tuned", 1)):
        write_tokenizer(root / name, SENTENCES, vocab_size=300)
        random_checkpoint(root / name, arch="qwen3", seed=seed, **SHAPE)
    data = root / "records.jsonl"
    rows = [{"prompt": SENTENCES[i % 3], "response": " ".join(SENTENCES[(i + k) % 3] for k in range(3))}
            for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "base"), str(root / "tuned"), str(data)


def _fresh(mode: str, setup) -> dict:
    out = subprocess.run([sys.executable, __file__, mode, *setup], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_drift_layer_streaming(benchmark, setup, mode):
    from driftscope import drift

    fresh = _fresh(mode, setup)
    benchmark.group = GROUP
    benchmark.extra_info.update(role="baseline" if mode == "memory" else "stream-layers", **fresh)
    summary = benchmark.pedantic(lambda: drift(*setup, stream_layers=mode == "stream", **OPTS).summary, rounds=1,
                                 warmup_rounds=0)
    benchmark.extra_info["tokens_per_s"] = summary["timing"]["tokens"] / benchmark.stats.stats.median


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1], *sys.argv[2:5])))
