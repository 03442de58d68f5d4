"""Engine forward (CPU, float32) vs transformers' eager forward on the same ~100M-parameter checkpoint.

Workload: 4 sequences × 512 tokens = 2,048 tokens; ours packed with cu_seqlens, transformers as a
[4, 512] batch (equal lengths, so no padding is wasted on its side). Both return final hidden states
(no LM head). Throughput = 2,048 tokens / median time. Peak memory from bench/peak_rss.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

SEQ_LEN, N_SEQS = 512, 4
GROUP = "engine-forward-2k-f32"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ckpt(qwen3_100m) -> Path:
    return qwen3_100m


def _peak_mb(workload: str, ckpt: Path) -> float:
    out = subprocess.run(
        [sys.executable, str(HERE / "peak_rss.py"), workload, str(ckpt), str(SEQ_LEN), str(N_SEQS)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def _ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (N_SEQS, SEQ_LEN), generator=g)


def test_transformers_eager_forward(benchmark, ckpt):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(hf.config.vocab_size)

    def run():
        with torch.inference_mode():
            return hf.model(input_ids=ids).last_hidden_state

    benchmark.group = GROUP
    benchmark.extra_info.update(role="baseline", tokens=ids.numel(), peak_extra_mb=_peak_mb("transformers", ckpt))
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = ids.numel() / benchmark.stats.stats.median


def test_engine_forward(benchmark, ckpt):
    from driftscope import load_model

    model = load_model(ckpt)
    ids = _ids(model.config.vocab_size).reshape(-1)
    cu = torch.arange(0, ids.numel() + 1, SEQ_LEN, dtype=torch.int32)
    benchmark.group = GROUP
    benchmark.extra_info.update(role="driftscope", tokens=ids.numel(), peak_extra_mb=_peak_mb("engine", ckpt))
    benchmark.pedantic(lambda: model(ids, cu), rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = ids.numel() / benchmark.stats.stats.median


def test_engine_matches_transformers_on_bench_checkpoint(ckpt):
    """Not a timing: the two timed forwards compute the same thing (guards against a fast wrong engine)."""
    from driftscope import load_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(ckpt)
    ids = _ids(model.config.vocab_size)[:, :64]
    with torch.inference_mode():
        ref = hf.model(input_ids=ids).last_hidden_state.reshape(-1, hf.config.hidden_size)
    cu = torch.arange(0, ids.numel() + 1, 64, dtype=torch.int32)
    got = model(ids.reshape(-1), cu).hidden
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err <= 1e-4, f"engine vs transformers rel err {err:.3e}"
