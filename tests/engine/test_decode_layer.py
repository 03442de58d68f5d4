"""The row-wise glue kernels (kernels/glue.py) and the decode step's fused layer (engine/decode_layer.py).

Each glue kernel against its float32 torch reference on random and adversarial rows (large and tiny magnitudes, a
zero row, strided rows, saturating silu inputs, partial rotary dims, T = 1, and prefill-sized T over the pool's
64-row chunks, whose result must not depend on the chunking); then the decode layer against the torch
path of `Block.forward` on the states of real generations, every architecture case: at each decode call both run on
the same input and the same cache (the cache restored between them), outputs and cache writes compared.
"""
from __future__ import annotations

import pytest
import torch
from engine_helpers import CASE_IDS, CASES, assert_close
from gen_helpers import prompts, run

from driftscope.engine import decode_layer
from driftscope.engine.loader import load_model
from driftscope.engine.sampling import SamplingParams
from driftscope.kernels._dispatch import use_backend
from driftscope.kernels.glue import (
    add_rms_norm,
    add_rms_norm_torch,
    rms_norm,
    rms_norm_torch,
    rope_cache_write_,
    rope_cache_write_torch,
    silu_mul,
    silu_mul_torch,
)

TOL = 2e-6  # max|Δ| / max|ref|: float32 rounding of a different summation order / exp polynomial


def _rows(T: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    if T >= 4:
        x[1] *= 1e4  # large
        x[2] *= 1e-4  # tiny (eps matters)
        x[3] = 0  # a zero row: rsqrt(eps), finite
    return x


@pytest.mark.parametrize("T,d", [(1, 576), (16, 576), (5, 24), (7, 100), (200, 64)])
def test_rms_norm_matches_the_reference(T, d):
    x = _rows(T, d, 1)
    w = torch.randn(d)
    for eps in (1e-6, 1e-5):
        assert_close(rms_norm(x, w, eps), rms_norm_torch(x, w, eps), TOL, f"rms_norm T={T} d={d}")
        for r in range(T):  # row-wise relative error: the tiny rows are not hidden by the large one
            assert_close(rms_norm(x[r : r + 1], w, eps), rms_norm_torch(x[r : r + 1], w, eps), TOL, f"row {r}")
    wide = torch.randn(T, d + 9)
    wide[:, :d] = x
    assert torch.equal(rms_norm(wide[:, :d], w, 1e-6), rms_norm(x, w, 1e-6)), "strided rows read in place"


@pytest.mark.parametrize("T,d", [(1, 64), (16, 576), (6, 33), (130, 40)])
def test_add_rms_norm_matches_the_reference(T, d):
    h, a, w = _rows(T, d, 2), torch.randn(T, d), torch.randn(d)
    res, out = add_rms_norm(h, a, w, 1e-6)
    ref_res, ref_out = add_rms_norm_torch(h, a, w, 1e-6)
    assert torch.equal(res, ref_res), "the residual sum is one float32 add per element"
    for r in range(T):
        assert_close(out[r], ref_out[r], TOL, f"add_rms_norm row {r}")


@pytest.mark.parametrize("T,inter", [(1, 96), (16, 1536), (3, 37), (300, 50)])
def test_silu_mul_matches_the_reference(T, inter):
    gu = torch.randn(T, 2 * inter) * 4
    gu[0, :8] = torch.tensor([0.0, -0.0, 88.0, -88.0, 200.0, -200.0, 1e-30, -1e-30])  # exp range edges
    out, ref = silu_mul(gu), silu_mul_torch(gu)
    assert torch.isfinite(out).all()
    diff = (out - ref).abs()
    assert (diff <= 4e-7 * ref.abs() + 1e-30).all(), f"max rel err {(diff / ref.abs().clamp_min(1e-30)).max():.3g}"


@pytest.mark.parametrize("T,hq,hkv,D,R", [(1, 9, 3, 64, 32), (16, 4, 2, 24, 12), (5, 4, 4, 16, 4), (3, 2, 1, 24, 4),
                                         (150, 4, 2, 16, 8)])
def test_rope_cache_write_matches_the_reference(T, hq, hkv, D, R):
    g = torch.Generator().manual_seed(T + D)
    qkv = torch.randn(T, hq + 2 * hkv, D, generator=g)
    pos = torch.arange(T, dtype=torch.float32)[:, None] * 3 + 1
    ang = pos * torch.rand(R, generator=g)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, R], as LayerBatch holds them
    S = 4 * T + 5
    slots = torch.randperm(S, generator=g)[:T]
    caches = [torch.full((S, hkv, D), float("nan")) for _ in range(4)]
    ours, ref = qkv.clone(), qkv.clone()
    rope_cache_write_(ours, cos, sin, caches[0], caches[1], slots, hq, hkv)
    rope_cache_write_torch(ref, cos, sin, caches[2], caches[3], slots, hq, hkv)
    assert_close(ours, ref, TOL, "rotated q|k|v")
    alone = qkv.clone()
    rope_cache_write_(alone, cos, sin, None, None, None, hq, hkv)  # rope only: the same rotation, no cache
    assert torch.equal(alone, ours)
    assert torch.equal(ours[:, :, 2 * R :], qkv[:, :, 2 * R :]), "dims past the rotary ones pass through"
    assert torch.equal(ours[:, hq + hkv :], qkv[:, hq + hkv :]), "v is not rotated"
    for mine, theirs in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(mine.isnan(), theirs.isnan()), "the same slots written"
        assert_close(mine[slots], theirs[slots], TOL, "cache rows")
    assert torch.equal(caches[0][slots], ours[:, hq : hq + hkv]), "the rotated keys are what is cached"
    assert torch.equal(caches[1][slots], ours[:, hq + hkv :]), "the values are cached as they are"


def test_rows_do_not_depend_on_the_batch():
    """A row alone, or among 199 others (4 pool chunks): the same bits from every kernel."""
    x, w = _rows(200, 96, 3), torch.randn(96)
    gu = torch.randn(200, 2 * 96)
    qkv = torch.randn(200, 8, 16)
    cos, sin = torch.rand(200, 1, 8), torch.rand(200, 1, 8)
    whole = qkv.clone()
    rope_cache_write_(whole, cos, sin, None, None, None, 4, 2)
    res, out = add_rms_norm(x, gu[:, :96], w, 1e-6)
    for r in (0, 63, 64, 199):
        one = qkv[r : r + 1].clone()
        rope_cache_write_(one, cos[r : r + 1], sin[r : r + 1], None, None, None, 4, 2)
        assert torch.equal(one[0], whole[r]), f"rope row {r}"
        assert torch.equal(rms_norm(x[r : r + 1], w, 1e-6)[0], rms_norm(x, w, 1e-6)[r]), f"rms_norm row {r}"
        assert torch.equal(silu_mul(gu[r : r + 1])[0], silu_mul(gu)[r]), f"silu_mul row {r}"
        assert torch.equal(add_rms_norm(x[r : r + 1], gu[r : r + 1, :96], w, 1e-6)[1][0], out[r]), f"add row {r}"


def test_rope_cache_write_refuses_a_slot_outside_the_cache():
    qkv = torch.randn(2, 4, 8)
    cos = sin = torch.ones(2, 1, 4)
    kc, vc = torch.zeros(6, 1, 8), torch.zeros(6, 1, 8)
    with pytest.raises(ValueError, match=r"slots\[1\]=6 outside the cache"):
        rope_cache_write_(qkv, cos, sin, kc, vc, torch.tensor([0, 6]), 2, 1)


def _compare_with_the_torch_path(monkeypatch):
    """Wrap decode_block: each call also runs Block.forward's torch ops on the same input and cache; returns the
    list of (case step) comparisons made."""
    fused = decode_layer.decode_block
    seen = []

    def both(block, h, batch):
        kc, vc = batch.kv.k[block.attn.layer_idx], batch.kv.v[block.attn.layer_idx]
        k0, v0 = kc.clone(), vc.clone()
        out = fused(block, h, batch)
        k1, v1 = kc.clone(), vc.clone()
        kc.copy_(k0), vc.copy_(v0)
        with monkeypatch.context() as m:
            m.setattr(decode_layer, "takes", lambda *a: False)
            ref = block(h, batch)
        assert_close(out, ref, 1e-5, f"layer {block.attn.layer_idx}, {h.shape[0]} sequences")
        written = batch.kv.slot_mapping
        assert_close(k1[written], kc[written], 1e-5, "keys written")
        assert_close(v1[written], vc[written], 1e-5, "values written")
        rest = torch.ones(kc.shape[0], dtype=torch.bool)
        rest[written] = False
        for mine, theirs in ((k1, kc), (v1, vc)):
            assert torch.equal(mine[rest].nan_to_num(7.0), theirs[rest].nan_to_num(7.0)), "no other slot written"
        seen.append(h.shape[0])
        return out

    monkeypatch.setattr(decode_layer, "decode_block", both)
    return seen


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_the_fused_layer_equals_the_torch_path_in_generation(checkpoints, monkeypatch, case):
    seen = _compare_with_the_torch_path(monkeypatch)
    model = load_model(checkpoints.path(case))
    run(model, prompts(model.config.vocab_size), SamplingParams(max_new_tokens=6), max_num_seqs=4)
    assert len(seen) >= 2 * 5 and max(seen) > 1, f"decode steps that took the fused layer: {seen}"


def test_a_forced_torch_backend_keeps_the_torch_ops(checkpoints, monkeypatch):
    seen = _compare_with_the_torch_path(monkeypatch)
    model = load_model(checkpoints.path(CASES[0]))
    with use_backend("torch"):
        run(model, prompts(model.config.vocab_size), SamplingParams(max_new_tokens=4))
    assert seen == []
