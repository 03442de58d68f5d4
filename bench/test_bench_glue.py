"""The row-wise glue between a layer's GEMMs (kernels/glue.py) against the torch ops it replaced, at SmolLM2-135M's
shapes (hidden 576, intermediate 1536, 9 q / 3 kv heads of 64), float32: one layer's glue (RMSNorm, rope on q|k,
residual add + RMSNorm, silu·up into the down GEMM's input, the final residual add) at a decode step's 16 rows and at a
prefill's 2,048. Baseline: engine/model.py's torch ops before the glue (the same arithmetic: tests/engine/
test_decode_layer.py), including the copy oneDNN made of the strided gate.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from driftscope.engine.model import _rstd
from driftscope.engine.rope import apply_rope_
from driftscope.kernels import glue
from driftscope.kernels._dispatch import cpp_status

pytestmark = pytest.mark.skipif(not cpp_status("cpu"), reason="driftscope._C is not built")
HIDDEN, INTER, HQ, HKV, D = 576, 1536, 9, 3, 64


def _inputs(rows: int):
    g = torch.Generator().manual_seed(rows)
    return dict(h=torch.randn(rows, HIDDEN, generator=g), a=torch.randn(rows, HIDDEN, generator=g),
                w=torch.rand(HIDDEN, generator=g) + 0.5, qkv=torch.randn(rows, HQ + 2 * HKV, D, generator=g),
                cos=torch.rand(rows, 1, D // 2, generator=g), sin=torch.rand(rows, 1, D // 2, generator=g),
                gu=torch.randn(rows, 2 * INTER, generator=g))


def _torch_layer(t):
    x = torch.mul(t["h"], _rstd(t["h"], 1e-5)).mul_(t["w"])
    apply_rope_(t["qkv"][:, : HQ + HKV], t["cos"], t["sin"])
    r = t["h"] + t["a"]
    x = torch.mul(r, _rstd(r, 1e-5)).mul_(t["w"])
    g = t["gu"][:, :INTER]
    F.silu(g, inplace=True).mul_(t["gu"][:, INTER:])
    return r.add_(g.contiguous()[:, :HIDDEN]), x


def _glue_layer(t):
    x = glue.rms_norm(t["h"], t["w"], 1e-5)
    glue.rope_cache_write_(t["qkv"], t["cos"], t["sin"], None, None, None, HQ, HKV)
    r, x = glue.add_rms_norm(t["h"], t["a"], t["w"], 1e-5)
    return r.add_(glue.silu_mul(t["gu"])[:, :HIDDEN]), x


@pytest.mark.parametrize("rows", [16, 2048])
@pytest.mark.parametrize("impl", ["torch ops", "glue"])
def test_layer_glue(benchmark, rows, impl):
    t = _inputs(rows)
    layer = _torch_layer if impl == "torch ops" else _glue_layer
    benchmark.group = f"layer-glue-{rows}-rows"
    benchmark.extra_info["role"] = "baseline" if impl == "torch ops" else "glue"
    fresh = lambda: (({k: v.clone() for k, v in t.items()},), {})  # noqa: E731  in-place ops: each round its inputs
    benchmark.pedantic(layer, setup=fresh, rounds=30 if rows == 16 else 10, warmup_rounds=2, iterations=1)
