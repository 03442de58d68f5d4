"""vocab_probe: torch reference vs float64, cpp and triton vs the reference, over one shape table.

Tolerances (measured: cpp/triton vs torch on the random cases differ by ≤ 1e-6 in KL and ≤ 3e-6 in
entropy; the reference vs float64 by ≤ 1e-6): KL |Δ| ≤ 1e-5 abs or 1e-4 rel; lse/logp/entropy
≤ 2e-5 abs + 1e-5 rel (logits of magnitude 1e4 make lse ~1e4, hence the relative part); ranks,
argmaxes and rank_shift_top exactly equal.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

from driftscope.kernels import use_backend
from driftscope.kernels.vocab_probe.common import METRICS
from kernel_helpers import assert_close_verbose

FLOAT_FIELDS = tuple(m.name for m in METRICS if m.dtype.is_floating_point)  # the result's fields, as declared
INT_FIELDS = tuple(m.name for m in METRICS if not m.dtype.is_floating_point)
# the module (driftscope.kernels.vocab_probe is also the re-exported function of the same name)
vp = importlib.import_module("driftscope.kernels.vocab_probe")
DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@dataclass(frozen=True)
class Case:
    n: int
    v: int
    d: int
    dtype: torch.dtype = torch.float32
    kind: str = "random"  # random | scale1e4 | ties | identical

    @property
    def id(self) -> str:
        return f"N{self.n}-V{self.v}-d{self.d}-{DT[self.dtype]}" + ("" if self.kind == "random" else f"-{self.kind}")


CASES = [
    Case(1, 1000, 64),
    Case(37, 1000, 64),
    Case(37, 4099, 72),  # odd V, d not a multiple of 16
    Case(37, 1000, 64, torch.bfloat16),
    Case(17, 4099, 40, torch.float16),
    Case(37, 1000, 64, kind="scale1e4"),
    Case(37, 1000, 48, kind="ties"),
    Case(37, 4099, 24, torch.bfloat16, kind="ties"),
    Case(37, 1000, 64, kind="identical"),
    Case(5, 1000, 64, torch.bfloat16, kind="identical"),
    Case(3, 262_144, 16, torch.bfloat16),  # the largest vocabulary the contract names
    Case(2, 300, 8200),  # d beyond 8192, not a multiple of 16
]
TRITON_CASES = [c for c in CASES if c.v <= 1000 or c.id == "N37-V4099-d72-f32"]


def make_inputs(case: Case, seed: int = 0):
    """(h_base, w_base, h_tuned, w_tuned, targets); targets[0] is the base model's unique top-1
    where the data has no ties."""
    g = torch.Generator().manual_seed(seed)
    n, v, d = case.n, case.v, case.d
    if case.kind == "ties":
        # small integers: every logit is an exact integer in fp32 whatever the summation order, so
        # exact ties are everywhere; plus duplicated LM-head rows (equal logits by construction)
        hb = torch.randint(-2, 3, (n, d), generator=g).float()
        wb = torch.randint(-1, 2, (v, d), generator=g).float()
        wb[v // 2 :: 5] = wb[3]
        ht = hb.clone()
        ht[:, : d // 4] = torch.randint(-2, 3, (n, d // 4), generator=g).float()
        wt = wb.clone()
        wt[::3, 0] += 1
    else:
        hb = 2.0 * torch.randn(n, d, generator=g)
        wb = torch.randn(v, d, generator=g) / d**0.5
        ht = hb + 0.5 * torch.randn(n, d, generator=g)
        wt = wb + 0.2 * torch.randn(v, d, generator=g) / d**0.5
        if case.kind == "scale1e4":
            # every logit ≈ 1e4 + O(5), exactly representable (multiples of 2^-7 below 2^14): all GEMM
            # orders give the same bits, so this isolates the fold's cancellation at magnitude 1e4
            hb = torch.randint(-8, 9, (n, d), generator=g) / 4
            wb = torch.randint(-8, 9, (v, d), generator=g) / 8 / 4
            ht = hb + torch.randint(-1, 2, (n, d), generator=g) / 4
            wt = wb + torch.randint(-1, 2, (v, d), generator=g) / 32
            hb[:, 0] = ht[:, 0] = 1e4
            wb[:, 0] = wt[:, 0] = 1.0
        if case.kind == "identical":
            ht, wt = hb.clone(), wb.clone()
    hb, wb, ht, wt = (t.to(case.dtype) for t in (hb, wb, ht, wt))
    targets = torch.randint(0, v, (n,), generator=g)
    if case.kind != "ties" and n:
        targets[0] = (hb[0].float() @ wb.float().T).argmax()
    return hb, wb, ht, wt, targets


def probe_float64(zb: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics of given logits, computed in float64 the textbook way."""
    zb, zt = zb.double(), zt.double()
    lq, lp = zb.log_softmax(-1), zt.log_softmax(-1)
    q, p = lq.exp(), lp.exp()
    top_t = zt.argmax(-1)
    return {
        "kl_tb": (p * (lp - lq)).sum(-1), "kl_bt": (q * (lq - lp)).sum(-1),
        "logp_base": lq.gather(1, y[:, None])[:, 0], "logp_tuned": lp.gather(1, y[:, None])[:, 0],
        "rank_base": 1 + (zb > zb.gather(1, y[:, None])).sum(-1),
        "rank_tuned": 1 + (zt > zt.gather(1, y[:, None])).sum(-1),
        "top_base": zb.argmax(-1), "top_tuned": top_t,
        "rank_shift_top": 1 + (zb > zb.gather(1, top_t[:, None])).sum(-1),
        "entropy_base": -(q * lq).sum(-1), "entropy_tuned": -(p * lp).sum(-1),
        "lse_base": zb.logsumexp(-1), "lse_tuned": zt.logsumexp(-1),
    }


def assert_result_close(got: vp.VocabProbeResult, want, what: str, *, has_targets: bool = True) -> None:
    want = want if isinstance(want, dict) else want.to_dict()
    for name in FLOAT_FIELDS + INT_FIELDS:
        g, w = getattr(got, name), want[name]
        if not has_targets and name in ("logp_base", "logp_tuned", "rank_base", "rank_tuned"):
            assert g is None, f"{what}: {name} should be None without targets"
            continue
        if name in INT_FIELDS:
            assert g.dtype == torch.int64, f"{what}: {name} dtype {g.dtype}"
            assert_close_verbose(g, w.to(g.device), what=f"{what} {name}")
        else:
            assert g.dtype == torch.float32, f"{what}: {name} dtype {g.dtype}"
            atol, rtol = (1e-5, 1e-4) if name.startswith("kl") else (2e-5, 1e-5)
            assert_close_verbose(g, w.to(g.device), atol=atol, rtol=rtol, what=f"{what} {name}")


def check_structure(res: vp.VocabProbeResult, case: Case) -> None:
    """Every element written (outputs start as NaN / negative sentinels), ranks in [1, V]."""
    for name in FLOAT_FIELDS:
        t = getattr(res, name)
        assert not t.isnan().any(), f"{name}: {int(t.isnan().sum())} unwritten/NaN elements"
    for name in ("rank_base", "rank_tuned", "rank_shift_top"):
        t = getattr(res, name)
        assert int(t.min()) >= 1 and int(t.max()) <= case.v, f"{name} out of [1, {case.v}]: {t.tolist()[:8]}"
    for name in ("top_base", "top_tuned"):
        t = getattr(res, name)
        assert int(t.min()) >= 0 and int(t.max()) < case.v, f"{name} out of [0, {case.v})"


def check_case_invariants(res: vp.VocabProbeResult, case: Case) -> None:
    if case.kind == "identical":
        assert float(res.kl_tb.abs().max()) <= 1e-6 and float(res.kl_bt.abs().max()) <= 1e-6
        assert_close_verbose(res.rank_shift_top, torch.ones_like(res.rank_shift_top), what="identical: rank_shift_top")
        assert_close_verbose(res.rank_base, res.rank_tuned, what="identical: rank_base vs rank_tuned")
        assert_close_verbose(res.top_base, res.top_tuned, what="identical: top_base vs top_tuned")
    if case.kind != "ties":  # row 0's target is the base model's unique maximum
        assert int(res.rank_base[0]) == 1, f"target is the unique max but rank_base[0]={int(res.rank_base[0])}"
        assert int(res.top_base[0]) == int(make_inputs(case)[4][0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_reference_vs_float64(case):
    hb, wb, ht, wt, y = make_inputs(case)
    res = vp.vocab_probe_torch(hb, wb, ht, wt, y)
    zb, zt = hb.float() @ wb.float().T, ht.float() @ wt.float().T  # the reference's own fp32 logits
    assert_result_close(res, probe_float64(zb, zt, y), f"torch vs float64 [{case.id}]")
    check_structure(res, case)
    check_case_invariants(res, case)


# cpp layouts: default tiles (one chunk for small V); small tiles and chunks (many tiles, many chunks,
# a top-k too small for rank_shift_top, so the exact second pass runs); chunks of 700 and 300 columns (the fold's
# 512-column blocks: a full and a partial one, then a partial one alone); and a prologue target logit
# pushed one ulp off the scanned one, which must be detected and recounted exactly.
CPP_LAYOUTS = {
    "default": {},
    "tile8-chunk128-k4": {"tile": 8, "chunk": 128, "topk": 4},
    "tile8-chunk700-k4": {"tile": 8, "chunk": 700, "topk": 4},
    "tile5-chunk100-perturbed": {"tile": 5, "chunk": 100, "topk": 2, "_perturb_prologue": True},
}


@pytest.mark.parametrize("layout", list(CPP_LAYOUTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpp_vs_reference(case, layout):
    pytest.importorskip("driftscope._C")
    hb, wb, ht, wt, y = make_inputs(case)
    want = vp.vocab_probe_torch(hb, wb, ht, wt, y)
    if layout == "default":
        with use_backend("cpp"):
            got = vp.vocab_probe(hb, wb, ht, wt, y)
    else:
        got = vp.vocab_probe_cpp(hb, wb, ht, wt, y, **CPP_LAYOUTS[layout])
    assert_result_close(got, want, f"cpp[{layout}] vs torch [{case.id}]")
    check_structure(got, case)
    check_case_invariants(got, case)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_triton_vs_reference(case, triton_device):
    hb, wb, ht, wt, y = make_inputs(case)
    want = vp.vocab_probe_torch(hb, wb, ht, wt, y)
    with use_backend("triton"):
        got = vp.vocab_probe(*(t.to(triton_device) for t in (hb, wb, ht, wt, y)))
    assert_result_close(got, want, f"triton vs torch [{case.id}]")
    check_structure(got, case)
    check_case_invariants(got, case)


BACKENDS = ["torch", "cpp", "triton"]


def _run(backend: str, *args, **kwargs) -> vp.VocabProbeResult:
    if backend == "cpp":
        pytest.importorskip("driftscope._C")
    if backend == "triton":
        pytest.importorskip("triton")
    with use_backend(backend):
        return vp.vocab_probe(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_targets(backend):
    case = Case(9, 300, 32, torch.bfloat16)
    hb, wb, ht, wt, _ = make_inputs(case)
    got = _run(backend, hb, wb, ht, wt)
    assert_result_close(got, vp.vocab_probe_torch(hb, wb, ht, wt), f"{backend} no targets", has_targets=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    hb, wb, ht, wt, y = make_inputs(Case(0, 100, 16))
    got = _run(backend, hb, wb, ht, wt, y)
    for name in FLOAT_FIELDS + INT_FIELDS:
        assert getattr(got, name).shape == (0,), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_vocab_shared_prefix(backend):
    """A tuned head padded with 7 extra rows: valid_vocab=V computes over the shared prefix."""
    case = Case(6, 500, 32)
    hb, wb, ht, wt, y = make_inputs(case)
    wt_padded = torch.cat([wt, torch.randn(7, case.d) * 100])
    got = _run(backend, hb, wb, ht, wt_padded, y, valid_vocab=case.v)
    assert_result_close(got, vp.vocab_probe_torch(hb, wb, ht, wt, y), f"{backend} valid_vocab")
    y400 = y.clamp(max=399)
    got = _run(backend, hb, wb, ht, wt_padded, y400, valid_vocab=400)
    assert_result_close(got, vp.vocab_probe_torch(hb, wb[:400], ht, wt[:400], y400), f"{backend} valid_vocab=400")


def test_input_errors_name_the_argument():
    hb, wb, ht, wt, y = make_inputs(Case(4, 50, 8))
    with pytest.raises(ValueError, match=r"w_base has 50 rows, w_tuned has 53"):
        vp.vocab_probe(hb, wb, ht, torch.cat([wt, wt[:3]]), y)
    with pytest.raises(ValueError, match=r"valid_vocab=60 .*w_base has 50 rows, w_tuned has 53"):
        vp.vocab_probe(hb, wb, ht, torch.cat([wt, wt[:3]]), y, valid_vocab=60)
    with pytest.raises(ValueError, match=r"h_tuned has d=9 but w_tuned rows have d=8"):
        vp.vocab_probe(hb, wb, torch.randn(4, 9), wt, y)
    with pytest.raises(ValueError, match=r"h_base must be float32, bfloat16 or float16"):
        vp.vocab_probe(hb.double(), wb, ht, wt, y)
    with pytest.raises(ValueError, match=r"w_tuned must be 2-D"):
        vp.vocab_probe(hb, wb, ht, wt[0], y)
    with pytest.raises(ValueError, match=r"h_base has 4 tokens but h_tuned has 3"):
        vp.vocab_probe(hb, wb, ht[:3], wt, y)
    with pytest.raises(ValueError, match=r"targets\[2\]=50 is outside the vocabulary \[0, 50\)"):
        vp.vocab_probe(hb, wb, ht, wt, torch.tensor([0, 1, 50, 3]))
    with pytest.raises(ValueError, match=r"targets must have shape \[4\]"):
        vp.vocab_probe(hb, wb, ht, wt, y[:2])
    with pytest.raises(ValueError, match=r"targets must be int64 or int32"):
        vp.vocab_probe(hb, wb, ht, wt, y.float())


def test_default_backend_on_cpu_is_cpp():
    pytest.importorskip("driftscope._C")
    assert vp.VOCAB_PROBE.select("cpu") == "cpp"


def test_prologue_mismatch_rows_are_recounted_exactly():
    """Ties everywhere + target logits nudged one ulp: a count against the nudged value would be wrong
    for most rows; the recount against the scanned value must give the exact ranks."""
    pytest.importorskip("driftscope._C")
    case = Case(37, 1000, 48, kind="ties")
    hb, wb, ht, wt, y = make_inputs(case)
    want = vp.vocab_probe_torch(hb, wb, ht, wt, y)
    got = vp.vocab_probe_cpp(hb, wb, ht, wt, y, tile=16, chunk=256, _perturb_prologue=True)
    assert_close_verbose(got.rank_base, want.rank_base, what="rank_base")
    assert_close_verbose(got.rank_tuned, want.rank_tuned, what="rank_tuned")


@pytest.mark.parametrize("mode", ["forced", "topk2"])
@pytest.mark.parametrize("case", [Case(37, 1000, 48, kind="ties"), Case(21, 700, 40, torch.bfloat16)],
                         ids=lambda c: c.id)
def test_triton_recount_pass_is_exact(case, mode, triton_device):
    """Rows through the second (recount) kernel — all of them, or those a top-2 cannot decide —
    must get the exact ranks."""
    hb, wb, ht, wt, y = make_inputs(case)
    want = vp.vocab_probe_torch(hb, wb, ht, wt, y)
    kw = {"_force_recount": True} if mode == "forced" else {"topk": 2}
    got = vp.vocab_probe_fused(*(t.to(triton_device) for t in (hb, wb, ht, wt, y)), **kw)
    for name in ("rank_base", "rank_tuned", "rank_shift_top"):
        assert_close_verbose(getattr(got, name), getattr(want, name).to(triton_device), what=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Row-strided views (a column slice of a wider tensor) and a transposed-storage head."""
    case = Case(11, 333, 24)
    hb, wb, ht, wt, y = make_inputs(case)
    hb_wide = torch.cat([hb, torch.randn(case.n, 5)], 1)[:, : case.d]  # row stride d+5
    wt_colmajor = wt.T.contiguous().T  # [V, d] with column stride V
    got = _run(backend, hb_wide, wb, ht, wt_colmajor, y)
    assert_result_close(got, vp.vocab_probe_torch(hb, wb, ht, wt, y), f"{backend} strided")


def test_cpp_vs_float64_at_qwen_vocab():
    """At V=151,936 the fused fold (fp64 running state) is checked against float64 metrics of fp32
    logits directly: measured ≤ 3e-8 abs on KL, ≤ 5e-7 on entropy/lse (the fp32 torch reference
    itself is ≤ 1.3e-6 / 1e-5 off here)."""
    pytest.importorskip("driftscope._C")
    case = Case(16, 151_936, 64)
    hb, wb, ht, wt, y = make_inputs(case, seed=1)
    want = probe_float64(hb @ wb.T, ht @ wt.T, y)
    with use_backend("cpp"):
        got = vp.vocab_probe(hb, wb, ht, wt, y)
    assert_result_close(got, want, "cpp vs float64 at V=151936")
