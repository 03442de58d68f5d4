"""vocab_probe's panel path on the triton backend (fp32 logits panels from one GEMM each, folded by `triton_fold`)
against the fp32 reference: random and adversarial inputs, several panels, J tuned models, padded heads; the
selection rule (`triton_panel.vocab_path`), its override DRIFTSCOPE_VOCAB_PATH and what backend_status says of it.
Under TRITON_INTERPRET=1 on CPU (small shapes), plus one gpu-marked exactness test at the paper's vocabulary.

Tolerances as in test_vocab_probe (assert_result_close); ranks, argmaxes and rank_shift_top exactly equal.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from driftscope.kernels import backend_status, use_backend
from driftscope.kernels._dispatch import Availability
from kernel_helpers import assert_close_verbose
from test_vocab_probe import INT_FIELDS, Case, assert_result_close, check_structure, make_inputs, vp
from test_vocab_probe_exact import KINDS, _assert_identities, make_exact

panel = importlib.import_module("driftscope.kernels.vocab_probe.triton_panel")

CASES = [
    Case(1, 1000, 64),
    Case(37, 1000, 64),
    Case(37, 2999, 40),  # V not a multiple of the interpreter's BLOCK_V (512) nor of the panel's ld (64)
    Case(37, 1000, 64, torch.bfloat16),
    Case(17, 2999, 40, torch.float16),
    Case(37, 1000, 64, kind="scale1e4"),
    Case(37, 1000, 48, kind="ties"),
    Case(37, 2999, 24, torch.bfloat16, kind="ties"),
    Case(5, 1000, 64, torch.bfloat16, kind="identical"),
]
ROWS = {"one-panel": 64, "rows5": 5}  # 37 tokens: one panel, or 8 panels (the last of 2 rows)


def _to(device, *ts):
    return [t.to(device) if torch.is_tensor(t) else [x.to(device) for x in t] for t in ts]


def _panel(device, hb, wb, hts, wts, y, rows, **kw):
    """The panel launcher directly (inputs already valid, heads cut), results on the CPU."""
    out = panel.vocab_probe_panel(*_to(device, hb, wb, hts, wts), None if y is None else y.to(device), rows, **kw)
    return [vp.VocabProbeResult(**{k: None if t is None else t.cpu() for k, t in r.to_dict().items()}) for r in out]


def _assert_equal(a, b, what: str) -> None:
    for name, x in a.to_dict().items():
        y = getattr(b, name)
        assert (x is None) == (y is None), f"{what}: {name}"
        if x is not None:
            assert torch.equal(x, y), f"{what}: {name} differs in {int((x != y).sum())} of {x.numel()}"


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_panel_vs_reference(case, rows, triton_device):
    hb, wb, ht, wt, y = make_inputs(case)
    got = _panel(triton_device, hb, wb, [ht], [wt], y, ROWS[rows])[0]
    assert_result_close(got, vp.vocab_probe_torch(hb, wb, ht, wt, y), f"panel[{rows}] vs torch [{case.id}]")
    check_structure(got, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_panel_without_targets(dtype, triton_device):
    hb, wb, ht, wt, _ = make_inputs(Case(19, 1500, 32, dtype))
    got = _panel(triton_device, hb, wb, [ht], [wt], None, 6)[0]
    assert_result_close(got, vp.vocab_probe_torch(hb, wb, ht, wt), "panel, no targets", has_targets=False)


def _three_tuned(case: Case):
    """Base inputs and three tuned models: two other seeds and the mirrored head w_t = -w_b."""
    hb, wb, ht, wt, y = make_inputs(case, seed=0)
    _, _, h1, w1, _ = make_inputs(case, seed=1)
    return hb, wb, [ht, h1, hb.clone()], [wt, w1, -wb], y


@pytest.mark.parametrize("case", [Case(17, 1000, 64), Case(11, 1300, 40, torch.bfloat16),
                                  Case(17, 700, 48, kind="ties")], ids=lambda c: c.id)
def test_panel_j3_equals_single_calls_and_the_reference(case, triton_device):
    hb, wb, hts, wts, y = _three_tuned(case)
    many = _panel(triton_device, hb, wb, hts, wts, y, 8)
    ref = vp.vocab_probe_torch(hb, wb, hts, wts, y)
    assert len(many) == 3
    for j, (h, w) in enumerate(zip(hts, wts)):
        _assert_equal(many[j], _panel(triton_device, hb, wb, [h], [w], y, 8)[0], f"tuned {j} vs its single call")
        assert_result_close(many[j], ref[j], f"tuned {j} vs torch [{case.id}]")
    zb = hb.float() @ wb.float().T  # the mirror's top-1 is the base's bottom: every larger base logit counts
    bottom = zb.gather(1, many[2].top_tuned[:, None])
    assert_close_verbose(many[2].rank_shift_top, 1 + (zb > bottom).sum(-1), what="mirror rank_shift_top")


def test_api_panel_j3_and_padded_heads(triton_device, monkeypatch):
    """Through vocab_probe: J = 3 heads padded with 9 rows of huge logits; valid_vocab = V and a shorter prefix."""
    monkeypatch.setenv("DRIFTSCOPE_VOCAB_PATH", "panel")
    hb, wb, hts, wts, y = _three_tuned(Case(13, 1100, 32))
    pad = lambda w: torch.cat([w, 100 * torch.randn(9, w.shape[1])])
    for vocab in (1100, 700):
        yv = y.clamp(max=vocab - 1)
        ref = vp.vocab_probe_torch(hb, wb[:vocab], hts, [w[:vocab] for w in wts], yv)
        with use_backend("triton"):
            got = vp.vocab_probe(*_to(triton_device, hb, pad(wb), hts, [pad(w) for w in wts], yv), valid_vocab=vocab)
        for j, (g, r) in enumerate(zip(got, ref)):
            assert_result_close(g, r, f"api panel valid_vocab={vocab} tuned {j}")


def _integer_32(n: int = 17, v: int = 1300, d: int = 48, seed: int = 0):
    """h in {-2..2}/32, w in {-1, 0, 1}, duplicated head rows: every logit is a multiple of 1/32 below 2^19 in
    magnitude, exact in fp32 in any summation order, so every backend's logits are the reference's bits."""
    g = torch.Generator().manual_seed(seed)
    hb = torch.randint(-2, 3, (n, d), generator=g) / 32
    wb = torch.randint(-1, 2, (v, d), generator=g).float()
    wb[v // 2 :: 9] = wb[7]
    ht = hb.clone()
    ht[:, : d // 3] = torch.randint(-2, 3, (n, d // 3), generator=g) / 32
    wt = wb.clone()
    wt[::4, 2] -= 1
    y = torch.randint(0, v, (n,), generator=g)
    y[: n // 3] = 7  # tied with the duplicated rows
    return hb, wb, ht, wt, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", [*KINDS, "int32"])
def test_panel_exact_on_adversarial_inputs(kind, dtype, triton_device):
    """Exact ties, logits of ±1e4, a tuned top-1 tied with other base logits, mirrored heads, integer data over
    32: ranks, argmaxes and rank_shift_top equal to the reference, plus the reference-free identities."""
    inputs = _integer_32() if kind == "int32" else make_exact(kind)
    inputs = [t.to(dtype) for t in inputs[:4]] + [inputs[4]]  # bf16 values of small integers: still exact logits
    got = _panel(triton_device, *inputs[:2], [inputs[2]], [inputs[3]], inputs[4], 4, block_v=128)[0]  # ties span blocks
    want = vp.vocab_probe_torch(*inputs)
    assert_result_close(got, want, f"panel [{kind}, {dtype}]")
    _assert_identities(got, [t.float() for t in inputs[:4]] + [inputs[4]], kind)
    if kind == "mirror":  # z_t = -z_b: rank_base + rank_tuned = V + 2 - #{v : z_b,v = z_b,y} (y included)
        zb = inputs[0].float() @ inputs[1].float().T
        ties_y = (zb == zb.gather(1, inputs[4][:, None])).sum(-1)
        assert_close_verbose(got.rank_base + got.rank_tuned, zb.shape[1] + 2 - ties_y, what="mirror rank sum")


def test_mirror_unique_minimum_shift_is_v(triton_device):
    """Distinct base logits (random data) and w_t = -w_b: the tuned top-1 is the base's unique minimum."""
    hb, wb, _, _, y = make_inputs(Case(16, 1234, 32), seed=4)
    got = _panel(triton_device, hb, wb, [hb], [-wb], y, 5)[0]
    assert_close_verbose(got.rank_shift_top, torch.full((16,), 1234), what="rank_shift_top")
    assert_close_verbose(got.rank_base + got.rank_tuned, torch.full((16,), 1235), what="rank_base + rank_tuned")


def test_panel_float64_running_state(triton_device):
    """Logits near 1e4 over 38 16-wide blocks: KL within 1e-7 of float64 (sums relative to the running max)."""
    from test_vocab_probe import probe_float64

    hb, wb, ht, wt, y = make_inputs(Case(8, 600, 32, kind="scale1e4"), seed=3)
    want = probe_float64(hb @ wb.T, ht @ wt.T, y)
    got = _panel(triton_device, hb, wb, [ht], [wt], y, 8, block_v=16)[0]
    for name in ("kl_tb", "kl_bt"):
        assert_close_verbose(getattr(got, name), want[name], atol=1e-7, what=name)


# ------------------------------------------------------------------ the rule, its override and backend_status


@pytest.mark.parametrize("path", ["panel", "fused"])
def test_env_override_selects_the_path(path, triton_device, monkeypatch):
    """Both paths on the same inputs through vocab_probe, each spied on, each equal to the reference."""
    monkeypatch.setenv("DRIFTSCOPE_VOCAB_PATH", path)
    calls = []
    for name in ("vocab_probe_panel", "vocab_probe_fused"):
        real = getattr(panel, name)
        monkeypatch.setattr(panel, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    hb, wb, hts, wts, y = _three_tuned(Case(9, 300, 32))
    with use_backend("triton"):
        got = vp.vocab_probe(*_to(triton_device, hb, wb, hts, wts, y))
    assert calls == (["vocab_probe_panel"] if path == "panel" else ["vocab_probe_fused"] * 3), calls
    for g, r in zip(got, vp.vocab_probe_torch(hb, wb, hts, wts, y)):
        assert_result_close(g, r, f"{path} via the API")
    st = backend_status()["ops"]["vocab_probe"]["vocab_path"]
    assert st["path"] == path and f"DRIFTSCOPE_VOCAB_PATH={path}" in st["reason"], st


def test_rule_budget_rows_and_fallback(monkeypatch):
    monkeypatch.delenv("DRIFTSCOPE_VOCAB_PATH", raising=False)
    v = 151_936
    p = panel.vocab_path("cpu", 16384, v)  # 2 GiB: 1766 rows fit -> 10 even panels, rounded to 1664
    assert (p.path, p.rows) == ("panel", 1664) and panel.panel_bytes(p.rows, v) <= panel.PANEL_MAX_BYTES
    assert panel.vocab_path("cpu", 37, v).rows == 37
    monkeypatch.setattr(panel, "PANEL_MAX_BYTES", panel.panel_bytes(100, v))
    assert panel.vocab_path("cpu", 150, v).rows == 75  # 100 fit: two even panels of 75 (128 does not fit)
    monkeypatch.setattr(panel, "PANEL_MAX_BYTES", panel.panel_bytes(63, v))
    p = panel.vocab_path("cpu", 16384, v)
    assert p.path == "fused" and "do not fit" in p.reason, p
    assert panel.vocab_path("cpu", 40, v).path == "panel"  # 40 tokens need only 40 rows
    assert backend_status()["ops"]["vocab_probe"]["vocab_path"]["path"] == "fused"
    monkeypatch.setenv("DRIFTSCOPE_VOCAB_PATH", "panel")  # forced: at least PANEL_MIN_ROWS rows
    assert panel.vocab_path("cpu", 16384, v).rows == panel.PANEL_MIN_ROWS
    monkeypatch.setenv("DRIFTSCOPE_VOCAB_PATH", "chunked")
    with pytest.raises(ValueError, match="DRIFTSCOPE_VOCAB_PATH='chunked' is not a vocab path"):
        panel.vocab_path("cpu", 10, v)


def test_rule_without_mm_out_dtype(monkeypatch):
    """torch < 2.8 has no torch.mm(out_dtype=float32): on CUDA the rule falls back to fused, a forced panel raises."""
    monkeypatch.setattr(panel, "mm_out_dtype_status", lambda: Availability(False, "torch 2.4 lacks it"))
    monkeypatch.delenv("DRIFTSCOPE_VOCAB_PATH", raising=False)
    p = panel.vocab_path("cuda", 100, 1000)
    assert p.path == "fused" and "torch 2.4 lacks it" in p.reason, p
    assert panel.vocab_path("cpu", 100, 1000).path == "panel"  # the CPU GEMM is an fp32 one: not needed
    monkeypatch.setenv("DRIFTSCOPE_VOCAB_PATH", "panel")
    with pytest.raises(RuntimeError, match="forced but unavailable: torch 2.4 lacks it"):
        panel.vocab_path("cuda", 100, 1000)


def test_the_rule_off_cuda_never_probes_mm(monkeypatch):
    """Off CUDA the rule does not need torch.mm(out_dtype): it is not probed there (its meta-device call imported
    torch's symbolic shapes and sympy, ~1 s of every command that reports the backends)."""
    import subprocess
    import sys

    monkeypatch.setattr(panel, "mm_out_dtype_status", lambda: pytest.fail("probed off CUDA"))
    monkeypatch.delenv("DRIFTSCOPE_VOCAB_PATH", raising=False)
    assert panel.vocab_path("cpu", 100, 1000).path == "panel"
    code = ("import sys, driftscope; s = driftscope.backend_status(); "
            "print(s['ops']['vocab_probe']['vocab_path']['path'], "
            "[m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}).stdout
    assert out.split(maxsplit=1)[1].strip() == "[]", out


# ------------------------------------------------------------------ GPU: the paper's vocabulary, exact data


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
@pytest.mark.parametrize("path", ["panel", "fused"])
def test_gpu_exact_at_qwen_vocab(path, monkeypatch):
    """N = 1024, d = 4096, V = 151,936 cut to valid_vocab = 151,851, bf16 integer data over 32 (cuBLAS's bits
    are the reference's): ranks, argmaxes, rank_shift_top exact, floats to tolerance; J = 2 (the second tuned
    model mirrored); the panel path's peak extra memory within its two panels plus slack (no hidden copies)."""
    monkeypatch.setenv("DRIFTSCOPE_VOCAB_PATH", path)
    hb, wb, ht, wt, y = _integer_32(n=1024, v=151_936, d=4096, seed=1)
    vocab = 151_851
    hb, wb, ht, wt = (t.to("cuda", torch.bfloat16) for t in (hb, wb, ht, wt))
    y = y.clamp(max=vocab - 1).cuda()
    hts, wts = [ht, hb.clone()], [wt, -wb]
    rows = panel.vocab_path("cuda", 1024, vocab).rows
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with use_backend("triton"):
        got = vp.vocab_probe(hb, wb, hts, wts, y, valid_vocab=vocab)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    ref = vp.vocab_probe_torch(hb, wb[:vocab], hts, [w[:vocab] for w in wts], y)
    for j, (g, r) in enumerate(zip(got, ref)):
        assert_result_close(g, r, f"gpu {path} tuned {j}")
        for name in INT_FIELDS:
            assert torch.equal(getattr(g, name), getattr(r, name)), name
    if path == "panel":
        assert extra <= panel.panel_bytes(rows, vocab + 64) + (64 << 20), f"peak extra {extra / 2**20:.0f} MiB"
