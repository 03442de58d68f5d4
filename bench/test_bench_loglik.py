"""Log-likelihood throughput (CPU, float32): the `driftscope` lm-eval model vs lm-eval's own `hf` model
(transformers) on the same ~100M-parameter Qwen3 checkpoint and the same 128 token-level requests (32 contexts of
64-192 tokens × 4 continuations of 1-6 tokens, a multiple-choice workload), both through lm-eval's
`_loglikelihood_tokens` so tokenization is out of the timing. Baseline: lm-eval hf with batch_size=16.
driftscope packs sequences without padding, runs the LM head only on the scored rows, and runs each shared
context once (shared-prefix trees); the third variant turns the sharing off to show what each part is worth.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
GROUP = "loglikelihood-128-mc-f32"


@pytest.fixture(scope="module")
def ckpt(qwen3_100m, tmp_path_factory):
    from driftscope.testing import write_tokenizer

    d = tmp_path_factory.mktemp("loglik-bench")
    for f in os.listdir(qwen3_100m):
        os.symlink(qwen3_100m / f, d / f)
    write_tokenizer(d, ["a small corpus for a tokenizer the benchmark never uses for its token requests"] * 4)
    return d


@pytest.fixture(scope="module")
def requests():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(32):
        ctx = torch.randint(0, 32000, (int(torch.randint(64, 193, (1,), generator=g)),), generator=g).tolist()
        for _ in range(4):
            cont = torch.randint(0, 32000, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
            out.append(((None, None), ctx, cont))
    return out


def test_loglik_hf(benchmark, ckpt, requests):
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=16)
    benchmark.group, benchmark.extra_info["role"] = GROUP, "baseline"
    res = benchmark.pedantic(lambda: lm._loglikelihood_tokens(requests, disable_tqdm=True), rounds=2, iterations=1)
    test_loglik_hf.result = res


def test_loglik_driftscope(benchmark, ckpt, requests):
    from driftscope.eval.lm_model import DriftscopeLM

    lm = DriftscopeLM(pretrained=str(ckpt), dtype="float32", device="cpu")
    benchmark.group = GROUP
    res = benchmark.pedantic(lambda: lm._loglikelihood_tokens(requests, disable_tqdm=True), rounds=2, iterations=1)
    ref = getattr(test_loglik_hf, "result", None)
    if ref is not None:  # same answers as the baseline (run both in one session)
        for (a, ga), (b, gb) in zip(res, ref):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-3) and ga == gb


def test_loglik_driftscope_no_prefix_sharing(benchmark, ckpt, requests):
    """Packing and the scored-rows-only LM head alone: each continuation carries its own copy of the context."""
    from driftscope.engine.loader import load_model
    from driftscope.eval.loglik import score_continuations

    model = load_model(ckpt)
    pairs = [(ctx, cont) for _, ctx, cont in requests]
    benchmark.group = GROUP
    benchmark.pedantic(lambda: score_continuations(model, pairs, share_prefix=False), rounds=2, iterations=1)
