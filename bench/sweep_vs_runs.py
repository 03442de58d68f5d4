"""A sweep of K checkpoints (one pass: one base forward and one base head per batch for all K) against K separate
drift runs, interleaved rounds (A, B, A, B, ...), wall seconds end to end with every output written.

Usage: OMP_NUM_THREADS=1 python bench/sweep_vs_runs.py [--dir DIR] [--rounds 3] [--k 8]   -> markdown on stdout
The prediction comes first, from the stages (summary.json timing.stages) of one separate run: a K-checkpoint pass
shares plan, the base's load, the base's half of the lockstep forward and the base's half of the vocab probe; the
tuned halves, the per-model probes and each model's outputs are paid K times either way.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688)


def write_inputs(root: Path, k: int) -> tuple[Path, list[Path], Path]:
    """A random Qwen3 base, k checkpoints base + t·noise (t = 0.05 ... 0.05k, one noise direction), a records file."""
    import torch

    from driftscope.engine.config import ModelConfig
    from driftscope.testing import hf_config, random_state_dict, write_checkpoint, write_tokenizer

    texts = [f"Step {i}: the value of {i} times {i + 3} is {i * (i + 3)}, and adding {i} gives {i * (i + 4)}."
             for i in range(60)]
    base = root / "base"
    cfg = hf_config("qwen3", **SHAPE)
    state = random_state_dict(ModelConfig.from_dict(cfg, source="bench"), seed=0, std=0.05)
    if not (base / "model.safetensors").is_file():
        write_tokenizer(base, texts, vocab_size=400)
        write_checkpoint(base, cfg, state)
    ckpts = []
    g = torch.Generator().manual_seed(1)
    noise = {n: torch.randn(w.shape, generator=g) * w.std() for n, w in sorted(state.items())}
    for j in range(k):
        d = root / f"checkpoint-{(j + 1) * 50}"
        ckpts.append(d)
        if not (d / "model.safetensors").is_file():
            write_checkpoint(d, cfg, {n: w + 0.05 * (j + 1) * noise[n] if w.dim() == 2 else w
                                      for n, w in state.items()})
            shutil.copy(base / "tokenizer.json", d / "tokenizer.json")
    data = root / "records.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:20], "response": t}) + "\n" for t in texts))
    return base, ckpts, data


def sweep_arm(root: Path, base: Path, ckpts: list[Path], data: Path) -> tuple[float, dict]:
    from driftscope import sweep

    m = root / "sweep.json.in"
    m.write_text(json.dumps({"base": str(base), "checkpoints": [{"path": str(c), "label": c.name,
                             "step": int(c.name.split("-")[1])} for c in ckpts], "data": [str(data)],
                             "max_group": len(ckpts), "progress": False}))
    t0 = time.perf_counter()
    rep = sweep(m, root / "sweep-out", overwrite=True)
    return time.perf_counter() - t0, rep.sweep


def runs_arm(root: Path, base: Path, ckpts: list[Path], data: Path) -> tuple[float, list[dict]]:
    from driftscope import drift

    t0, summaries = time.perf_counter(), []
    for c in ckpts:
        summaries.append(drift(base, c, data, out=root / "runs-out" / c.name, overwrite=True, progress=False).summary)
    return time.perf_counter() - t0, summaries


def predict(summary: dict, k: int) -> float:
    """Seconds of a k-checkpoint pass from one separate run's stages (see the module docstring)."""
    st = summary["timing"]["stages"]
    shared_half = sum(st.get(s, 0.0) for s in ("load", "forward", "vocab_probe"))
    per_model = sum(v for s, v in st.items() if s not in ("plan", "load", "forward", "vocab_probe"))
    return st.get("plan", 0.0) + shared_half * (1 + k) / 2 + per_model * k


def compute_seconds(summaries: list[dict]) -> float:
    """Wall seconds of drift calls less their outputs stage (summary.json, token table, report.html plots)."""
    return sum(s["timing"]["wall_seconds"] - s["timing"]["stages"].get("outputs", 0.0) for s in summaries)


def _sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/driftscope-bench-sweep")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    base, ckpts, data = write_inputs(root, a.k)
    from driftscope import drift

    drift(base, ckpts[0], data, progress=False)  # warm-up: imports, first-call costs
    t0 = time.perf_counter()
    one = drift(base, ckpts[0], data, out=root / "profile", overwrite=True, progress=False).summary
    wall1 = time.perf_counter() - t0
    pred, stages = predict(one, a.k), one["timing"]["stages"]
    no_out = {**one, "timing": {**one["timing"], "stages": {**stages, "outputs": 0.0}}}
    pred_c, wall1_c = predict(no_out, a.k), compute_seconds([one])
    cpu = _sh("lscpu | grep 'Model name'")
    print(f"machine: {cpu} ({os.cpu_count()} cores), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}; load before: {_sh('uptime')}")
    print(f"one separate run: {wall1:.2f} s, {one['timing']['tokens']} tokens; stages {stages}")
    print(f"prediction: {a.k} runs {a.k * wall1:.1f} s, sweep {pred:.1f} s -> {a.k * wall1 / pred:.2f}x; without "
          f"outputs {a.k * wall1_c:.1f} s vs {pred_c:.1f} s -> {a.k * wall1_c / pred_c:.2f}x")
    rows = []
    for r in range(a.rounds):
        ta, s = sweep_arm(root, base, ckpts, data)
        tb, runs = runs_arm(root, base, ckpts, data)
        passes = [json.loads((root / "sweep-out" / p["summary"]).read_text()) for p in s["passes"]]
        ca, cb = compute_seconds(passes), compute_seconds(runs)
        rows.append((ta, tb, ca, cb))
        print(f"round {r + 1}: sweep {ta:.2f} s ({s['timing']['base_passes']} base pass), {a.k} runs {tb:.2f} s, "
              f"ratio {tb / ta:.2f}x; without outputs {ca:.2f} s vs {cb:.2f} s, ratio {cb / ca:.2f}x; "
              f"load {_sh('cat /proc/loadavg')}")
    for name, i in (("end to end", 0), ("without outputs", 2)):
        ratios = [r[i + 1] / r[i] for r in rows]
        print(f"median {name}: sweep {statistics.median(r[i] for r in rows):.2f} s, runs "
              f"{statistics.median(r[i + 1] for r in rows):.2f} s, speed-up {statistics.median(ratios):.2f}x "
              f"(spread {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"load after: {_sh('uptime')}")


if __name__ == "__main__":
    main()
