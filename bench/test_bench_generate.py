"""Generation throughput (CPU, float32): the driftscope engine (continuous batching, paged KV cache) vs transformers
`generate` on the same ~100M-parameter Qwen3 checkpoint, 16 prompts of mixed lengths and mixed output lengths
(bench/generate_workload.py). Throughput = 1,072 useful generated tokens / median time; transformers' batched run
pads every row to the longest output, so its extra rows are work, not useful tokens. Peak memory from a fresh
process (bench/peak_rss.py). Baseline: transformers batched (its fastest way on this workload).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import generate_workload as w  # noqa: E402

GROUP = "generate-16-mixed-f32"


@pytest.fixture(scope="module")
def ckpt(qwen3_100m) -> Path:
    return qwen3_100m


def _peak_mb(workload: str, ckpt: Path) -> float:
    out = subprocess.run([sys.executable, str(HERE / "peak_rss.py"), workload, str(ckpt), "0", "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def _hf(ckpt):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _record(benchmark, role: str, workload: str, ckpt: Path, run, rounds: int) -> None:
    benchmark.group = GROUP
    benchmark.extra_info.update(role=role, useful_tokens=w.USEFUL_TOKENS, peak_extra_mb=_peak_mb(workload, ckpt))
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = w.USEFUL_TOKENS / benchmark.stats.stats.median


def test_transformers_generate_batched(benchmark, ckpt):
    _record(benchmark, "baseline", "transformers-generate-batched", ckpt, w.transformers_batched_run(_hf(ckpt)), 3)


def test_transformers_generate_sequential(benchmark, ckpt):
    _record(benchmark, "transformers-sequential", "transformers-generate-sequential", ckpt,
            w.transformers_sequential_run(_hf(ckpt)), 1)


def test_driftscope_generate(benchmark, ckpt):
    from driftscope import load_model

    _record(benchmark, "driftscope", "generate", ckpt, w.driftscope_run(load_model(ckpt)), 3)


def test_driftscope_greedy_is_a_greedy_decoding_of_the_bench_checkpoint(ckpt):
    """Not a timing: every token the timed engine emits is transformers' argmax there (to float32 near-ties),
    so the fast run computes the right thing."""
    from driftscope import load_model

    hf = _hf(ckpt)
    outs = sorted(w.driftscope_run(load_model(ckpt))(), key=lambda g: g.index)
    for g, p in list(zip(outs, w.prompts(hf.config.vocab_size)))[:4]:
        with torch.inference_mode():
            z = hf(torch.tensor([p + g.token_ids])).logits[0, len(p) - 1:-1]  # [n, V]
        chosen = z.gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        gap = (z.max(-1).values - chosen) / z.abs().max()
        assert float(gap.max()) <= 1e-4, f"prompt {g.index}: a generated token is {float(gap.max()):.2e} below the max"
