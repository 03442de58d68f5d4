"""KLDStats against an independent reference of llama.cpp's --kl-divergence rules (tools/perplexity/perplexity.cpp):
moments in float64 torch, order statistics in float32 emulated with `struct` (each operation rounded to binary32)."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from probe_helpers import assert_close, fake_probe, subset

from driftscope.probes import KLDStats, load_state, save_state
from driftscope.probes.kld_stats import DP_PERCENTILES, KLD_PERCENTILES, llama_cpp_line


def f32(x: float) -> float:
    """x rounded to binary32 (a Python float holding a float32 value)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def ref_percentile(sorted_f32: list[float], fraction: float) -> float:
    """llama.cpp's `percentile` (float fraction, float p, (1-p)*v[i] + p*v[i+1]) with every float op rounded."""
    f, n = f32(fraction), len(sorted_f32)
    if f <= 0:
        return sorted_f32[0]
    if f >= 1:
        return sorted_f32[-1]
    p = f32(f * f32(n - 1))
    ip = int(p)
    p = f32(p - ip)
    return f32(f32(f32(1 - p) * sorted_f32[ip]) + f32(p * sorted_f32[min(ip + 1, n - 1)]))


def ref_median(v: list[float]) -> float:
    n = len(v)
    return v[n // 2] if n % 2 else f32(0.5 * f32(v[n // 2] + v[n // 2 - 1]))


def ref_mean_err(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    m = x.sum().item() / n
    var = (x * x).sum().item() / n - m * m
    return m, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def reference(probe: dict) -> dict:
    """The llama.cpp statistics of the unflagged rows of `probe`, written from perplexity.cpp's formulas."""
    ok = (probe["rank_shift_top"] >= 1) & probe["kl_bt"].isfinite() & probe["logp_base"].isfinite() \
        & probe["logp_tuned"].isfinite()
    kld = probe["kl_bt"][ok].double()
    lb, lt = probe["logp_base"][ok].double(), probe["logp_tuned"][ok].double()
    dp = lt.exp() - lb.exp()
    n = kld.numel()
    (mq, eq), (mb, eb) = ref_mean_err(-lt), ref_mean_err(-lb)
    cov = ((lt * lb).sum().item() / n - (lt.sum().item() / n) * (lb.sum().item() / n)) / (n - 1) if n >= 10 else 0.0
    ln_err2 = eq * eq + eb * eb - 2 * cov
    mse, mse_err = ref_mean_err(dp * dp)
    same = (probe["top_base"] == probe["top_tuned"])[ok].double().mean().item()
    ks = sorted(f32(v) for v in kld.tolist())
    ds = sorted(f32(v) for v in dp.tolist())
    return {
        "tokens": n, "flagged": int((~ok).sum()),
        "ln_ppl_ratio": mq - mb, "ln_ppl_ratio_err": math.sqrt(ln_err2) if ln_err2 >= 0 else None,
        "ppl_ratio": math.exp(mq - mb), "ppl_q": math.exp(mq), "ppl_base": math.exp(mb),
        "mean_kld": ref_mean_err(kld)[0], "mean_kld_err": ref_mean_err(kld)[1],
        "mean_dp": ref_mean_err(dp)[0], "mean_dp_err": ref_mean_err(dp)[1],
        "rms_dp": math.sqrt(mse), "rms_dp_err": 0.5 / math.sqrt(mse) * mse_err if mse > 0 else None,
        "same_top_p": same, "same_top_p_err": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else None,
        "max_kld": ks[-1], "min_kld": ks[0], "median_kld": ref_median(ks),
        "max_dp": ds[-1], "min_dp": ds[0], "median_dp": ref_median(ds),
        "kld_percentiles": {k: ref_percentile(ks, f32(float(k) / 100)) for k in KLD_PERCENTILES},
        "dp_percentiles": {k: ref_percentile(ds, f32(float(k) / 100)) for k in DP_PERCENTILES},
    }


ORDER_KEYS = ("max_kld", "min_kld", "median_kld", "max_dp", "min_dp", "median_dp")
MOMENT_KEYS = ("ln_ppl_ratio", "ln_ppl_ratio_err", "ppl_ratio", "ppl_q", "ppl_base", "mean_kld", "mean_kld_err",
               "mean_dp", "mean_dp_err", "rms_dp", "rms_dp_err", "same_top_p", "same_top_p_err")


def check(got: dict, ref: dict) -> None:
    assert (got["tokens"], got["flagged"]) == (ref["tokens"], ref["flagged"])
    for k in ORDER_KEYS:  # order statistics: exactly llama.cpp's float32 rule
        assert got[k] == ref[k], f"{k}: {got[k]!r} vs {ref[k]!r}"
    for group in ("kld_percentiles", "dp_percentiles"):
        assert list(got[group]) == list(ref[group]), group
        for k, v in ref[group].items():
            assert got[group][k] == v, f"{group}[{k}]: {got[group][k]!r} vs {v!r}"
    for k in MOMENT_KEYS:
        if ref[k] is None:
            assert got[k] is None, f"{k}: {got[k]!r}, expected None"
        else:
            assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12, what=k)


def with_edge_rows(n: int, seed: int) -> dict:
    """fake_probe rows plus every flagged shape: a vocab_probe-flagged row (NaN floats, -1 ints), a NaN KLD without
    the flag, and an -inf log p."""
    p = fake_probe(n, seed)
    p["rank_shift_top"][1] = -1
    for k in ("kl_bt", "logp_base", "logp_tuned"):
        p[k][1] = float("nan")
    p["top_base"][1] = p["top_tuned"][1] = -1
    p["kl_bt"][2] = float("nan")
    p["logp_tuned"][3] = float("-inf")
    return p


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (7, 2), (11, 3), (100, 4), (1001, 5)],
                         ids=lambda v: str(v))
def test_matches_reference_random(n, seed):
    acc = KLDStats()
    probe = fake_probe(n, seed)
    acc.update(probe)
    check(acc.finalize(), reference(probe))


def test_flagged_rows_left_out_and_counted():
    probe = with_edge_rows(300, 7)
    acc = KLDStats()
    acc.update(probe)
    got = acc.finalize()
    assert got["flagged"] == 3 and got["tokens"] == 297
    check(got, reference(probe))


def test_ties_and_all_equal():
    n = 257
    probe = fake_probe(n, 3)
    probe["kl_bt"] = torch.tensor([0.0, 0.25, 0.25, 0.5] * 64 + [0.25])
    probe["logp_base"] = torch.full((n,), -1.5)
    probe["logp_tuned"] = torch.full((n,), -1.5)  # Δp all zero: RMS 0, whose error llama.cpp's rule divides by
    acc = KLDStats()
    acc.update(probe)
    got = acc.finalize()
    check(got, reference(probe))
    assert got["median_kld"] == 0.25 and got["max_dp"] == got["min_dp"] == 0.0
    assert got["rms_dp"] == 0.0 and got["rms_dp_err"] is None
    assert got["ppl_ratio"] == 1.0 and got["ln_ppl_ratio"] == 0.0


def test_one_token_and_empty():
    probe = fake_probe(1, 9)
    acc = KLDStats()
    acc.update(subset(probe, slice(0, 0)))  # an empty batch changes nothing
    assert acc.finalize()["tokens"] == 0 and acc.finalize()["mean_kld"] is None
    acc.update(probe)
    got = acc.finalize()
    v = float(probe["kl_bt"][0])
    assert got["max_kld"] == got["min_kld"] == got["median_kld"] == v
    assert all(x == v for x in got["kld_percentiles"].values())
    assert got["mean_kld_err"] == 0.0 and got["same_top_p_err"] is None  # llama.cpp: 0 up to 10 tokens; 0/0


def test_percentile_rule_is_linear_interpolation():
    """The rule equals numpy's linear quantile up to float32 rounding, and two hand-checked values."""
    vals = np.sort(np.random.default_rng(0).standard_normal(999).astype(np.float32))
    probe = fake_probe(999, 1)
    probe["kl_bt"] = torch.from_numpy(vals[np.random.default_rng(1).permutation(999)].copy())
    acc = KLDStats()
    acc.update(probe)
    got = acc.finalize()["kld_percentiles"]
    for k in KLD_PERCENTILES:
        assert got[k] == pytest.approx(float(np.quantile(vals.astype(np.float64), float(k) / 100)), abs=1e-5), k
    probe = fake_probe(5, 2)
    probe["kl_bt"] = torch.tensor([4.0, 0.0, 3.0, 1.0, 2.0])
    acc = KLDStats()
    acc.update(probe)
    got = acc.finalize()
    assert got["kld_percentiles"]["99.9"] == f32(f32(f32(1 - f32(f32(f32(0.999) * 4) - 3)) * 3)
                                                 + f32(f32(f32(f32(0.999) * 4) - 3) * 4))
    assert got["median_kld"] == 2.0 and got["kld_percentiles"]["10.0"] == pytest.approx(0.4, abs=1e-6)


def test_merge_of_shards_equals_one_pass():
    probe = with_edge_rows(500, 11)
    one = KLDStats()
    one.update(probe)
    shards = []
    for part in (slice(0, 17), slice(17, 300), slice(300, 300), slice(300, 500)):
        acc = KLDStats()
        acc.update(subset(probe, part))
        shards.append(acc)
    merged = shards[3].merge(shards[1]).merge(shards[0]).merge(shards[2])  # any order
    a, b = merged.finalize(), one.finalize()
    for k in (*ORDER_KEYS, "kld_percentiles", "dp_percentiles", "tokens", "flagged"):
        assert a[k] == b[k], k
    for k in MOMENT_KEYS:
        assert_close(a[k], b[k], rtol=1e-12, what=k)


def test_state_round_trip(tmp_path):
    acc = KLDStats()
    acc.update(with_edge_rows(200, 4))
    acc.update(fake_probe(50, 5))
    save_state(acc, tmp_path / "kld.safetensors")
    back = load_state(KLDStats(), tmp_path / "kld.safetensors")
    assert back.finalize() == acc.finalize()
    back.update(fake_probe(30, 6))  # a resumed accumulator keeps accumulating
    acc.update(fake_probe(30, 6))
    assert back.finalize() == acc.finalize()


def test_bad_inputs_and_states():
    acc = KLDStats()
    probe = fake_probe(10, 0)
    probe["logp_base"] = probe["logp_base"][:9]
    with pytest.raises(ValueError, match="logp_base has shape"):
        acc.update(probe)
    probe = fake_probe(10, 0)
    probe["logp_tuned"] = None
    with pytest.raises(ValueError, match="logp_tuned"):
        acc.update(probe)
    sd = KLDStats().state_dict()
    with pytest.raises(ValueError, match="another version"):
        KLDStats().load_state_dict({k: v for k, v in sd.items() if k != "sums"})
    sd["values.kld"] = torch.zeros(3)
    with pytest.raises(ValueError, match="expected one of each per token"):
        KLDStats().load_state_dict(sd)
    with pytest.raises(TypeError):
        KLDStats().merge(object())


def test_terminal_line():
    acc = KLDStats()
    assert llama_cpp_line(acc.finalize()) == llama_cpp_line(None) == "no scored tokens"
    acc.update(fake_probe(200, 3))
    r = acc.finalize()
    line = llama_cpp_line(r)
    assert f"KLD mean {r['mean_kld']:.6f} p99 {r['kld_percentiles']['99.0']:.6f} max {r['max_kld']:.6f}" in line
    assert f"same top {100 * r['same_top_p']:.3f} %" in line and f"rms {100 * r['rms_dp']:.3f} %" in line


def test_rows_in_llama_cpp_order():
    from driftscope.probes.kld_stats import llama_cpp_rows

    assert llama_cpp_rows(KLDStats().finalize()) == {}
    acc = KLDStats()
    acc.update(fake_probe(200, 8))
    r = acc.finalize()
    rows = llama_cpp_rows(r)
    assert list(rows) == ["Perplexity statistics", "KL divergence statistics", "Token probability statistics"]
    kld = [label for label, _ in rows["KL divergence statistics"]]
    assert kld == ["Mean KLD", "Maximum KLD", "99.9% KLD", "99.0% KLD", "95.0% KLD", "90.0% KLD", "Median KLD",
                   "10.0% KLD", "5.0% KLD", "1.0% KLD", "0.1% KLD", "Minimum KLD"]
    dp = [label for label, _ in rows["Token probability statistics"]]
    assert dp == ["Mean Δp", "Maximum Δp", "99.9% Δp", "99.0% Δp", "95.0% Δp", "90.0% Δp", "75.0% Δp", "Median Δp",
                  "25.0% Δp", "10.0% Δp", "5.0% Δp", "1.0% Δp", "0.1% Δp", "Minimum Δp", "RMS Δp", "Same top p"]
    d = dict(rows["Token probability statistics"])
    assert d["Same top p"] == f"{100 * r['same_top_p']:.3f} ± {100 * r['same_top_p_err']:.3f} %"
    assert d["25.0% Δp"] == f"{100 * r['dp_percentiles']['25.0']:.3f}%"
    assert dict(rows["Perplexity statistics"])["Mean PPL(Q)/PPL(base)"] == \
        f"{r['ppl_ratio']:.6f} ± {r['ppl_ratio_err']:.6f}"
