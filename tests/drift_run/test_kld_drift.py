"""summary.json's "llama_cpp" block (KLDStats) of a drift run against float64 transformers logits of both models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_helpers import reference_tokens

from driftscope import drift, load_tokenizer
from driftscope.drift_run.bundle import TaskProbes, merge_kind
from driftscope.probes.kld_stats import DP_PERCENTILES, KLD_PERCENTILES
from driftscope.records import load_samples


def _percentile(sorted_v: np.ndarray, f: float) -> float:
    """Linear interpolation at f·(n−1) (llama.cpp's rule, here in float64)."""
    p = f * (sorted_v.size - 1)
    i = int(p)
    return float((1 - (p - i)) * sorted_v[i] + (p - i) * sorted_v[min(i + 1, sorted_v.size - 1)])


@pytest.fixture(scope="module")
def run_and_reference(models, records, tmp_path_factory):
    out = tmp_path_factory.mktemp("kld-drift")
    report = drift(models["base"], models["tuned"], records, out, progress=False, max_batch_tokens=96)
    samples, _ = load_samples(records, load_tokenizer(models["base"]))
    ref = reference_tokens(models["base"], models["tuned"], samples)
    on_disk = json.loads((out / "summary.json").read_text())["models"]["tuned"]["tasks"]["mixed"]["llama_cpp"]
    return report.summary["models"]["tuned"]["tasks"]["mixed"]["llama_cpp"], on_disk, ref, report


def test_llama_cpp_block_matches_float64_logits(run_and_reference):
    got, on_disk, r, _ = run_and_reference
    assert on_disk == got
    kld = r["kl_bt"]  # KL(base ‖ tuned): llama.cpp's KLD with base = the reference model
    dp = r["logp_tuned"].exp() - r["logp_base"].exp()
    n = kld.numel()
    assert got["tokens"] == n and got["flagged"] == 0
    tol = 2e-5  # per-token KL / log p within 1e-5 of float64 (test_drift); order statistics are 1-Lipschitz
    assert got["mean_kld"] == pytest.approx(kld.mean().item(), abs=tol)
    assert got["mean_dp"] == pytest.approx(dp.mean().item(), abs=tol)
    assert got["rms_dp"] == pytest.approx(dp.square().mean().sqrt().item(), abs=tol)
    ln_ratio = (r["logp_base"] - r["logp_tuned"]).mean().item()  # mean nll(Q) − mean nll(base)
    assert got["ln_ppl_ratio"] == pytest.approx(ln_ratio, abs=tol)
    assert got["ppl_ratio"] == pytest.approx(np.exp(ln_ratio), rel=tol)
    assert got["ppl_q"] == pytest.approx(np.exp(-r["logp_tuned"].mean().item()), rel=tol)
    assert got["same_top_p"] == pytest.approx((r["top_base"] == r["top_tuned"]).double().mean().item(), abs=1e-12)
    assert got["same_top_p"] < 1 and got["mean_kld"] > 1e-3  # the pair really differs
    ks, ds = np.sort(kld.numpy()), np.sort(dp.numpy())
    assert got["max_kld"] == pytest.approx(ks[-1], abs=tol) and got["min_kld"] == pytest.approx(ks[0], abs=tol)
    assert got["median_kld"] == pytest.approx(float(np.median(ks)), abs=tol)
    assert got["median_dp"] == pytest.approx(float(np.median(ds)), abs=tol)
    for k in KLD_PERCENTILES:
        assert got["kld_percentiles"][k] == pytest.approx(_percentile(ks, float(k) / 100), abs=tol), k
    for k in DP_PERCENTILES:
        assert got["dp_percentiles"][k] == pytest.approx(_percentile(ds, float(k) / 100), abs=tol), k
    err = lambda x: (((x**2).mean() - x.mean() ** 2) / (x.numel() - 1)).sqrt().item()  # noqa: E731
    assert got["mean_kld_err"] == pytest.approx(err(kld.double()), rel=1e-3)


def test_report_and_state_carry_the_block(run_and_reference):
    got, _, _, report = run_and_reference
    html = Path(report.files["report"]).read_text(encoding="utf-8")
    assert "llama.cpp --kl-divergence statistics" in html
    for label, value in [("Mean KLD", f"{got['mean_kld']:.6f} ± {got['mean_kld_err']:.6f}"),
                         ("99.9% KLD", f"{got['kld_percentiles']['99.9']:.6f}"),
                         ("Same top p", f"{100 * got['same_top_p']:.3f} ± {100 * got['same_top_p_err']:.3f} %")]:
        assert f"<td>{label}</td><td class=\"num\">{value}</td>" in html, label
    probes = TaskProbes(2, 3, 8, vocab_rows=10, pca="none", cka="none", cka_proj_dim=4)
    keys = probes.state_dict()
    assert {"m0.kld.values.kld", "m0.kld.values.dp", "m0.kld.sums", "m1.kld.counts"} <= set(keys)
    assert merge_kind("m0.kld.values.kld") == merge_kind("m1.kld.values.dp") == "cat"
    assert merge_kind("m0.kld.sums") == merge_kind("m0.kld.counts") == "sum"
    bad = {k: v for k, v in keys.items() if not k.startswith("m1.kld.")}
    with pytest.raises(ValueError, match="tuned model 1's kld"):
        probes.load_state_dict(bad)
    assert got["tokens"] > 0 and torch.is_tensor(keys["m0.kld.sums"])


def test_generate_mode_has_the_block(models, records, tmp_path):
    """drift --generate feeds KLDStats from the same vocab-probe results as TokenMetrics: the shared numbers agree."""
    run = drift(models["base"], [models["tuned"]], [records], tmp_path / "gen", generate=True, max_new_tokens=6,
                generate_chunk=4, progress=False, checkpoint_every=0)
    t = run.summary["models"]["tuned"]["tasks"]["mixed"]
    b = t["llama_cpp"]
    assert b["tokens"] == t["tokens"] > 0 and b["flagged"] == 0
    assert b["same_top_p"] == pytest.approx(t["top1_agreement"], abs=1e-12)
    assert b["mean_kld"] == pytest.approx(t["kl_bt"]["token_mean"], rel=1e-9)
    assert b["ln_ppl_ratio"] == pytest.approx(t["logp_base"]["token_mean"] - t["logp_tuned"]["token_mean"], abs=1e-9)
    assert b["min_kld"] <= b["median_kld"] <= b["max_kld"]


def test_cli_prints_the_headline_per_model_and_task(models, records, tmp_path, capsys):
    from driftscope.cli import main

    out = tmp_path / "out"
    assert main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--tuned",
                 str(models["late"]), "--data", str(records), "--out", str(out), "--max-batch-tokens", "96"]) == 0
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    lines = [x for x in printed if x.startswith("  llama.cpp: ")]
    assert len(lines) == 2, printed
    for line, model in zip(lines, ("tuned", "late")):
        b = summary["models"][model]["tasks"]["mixed"]["llama_cpp"]
        assert line == (f"  llama.cpp: KLD mean {b['mean_kld']:.6f} p99 {b['kld_percentiles']['99.0']:.6f} "
                        f"max {b['max_kld']:.6f}, same top {100 * b['same_top_p']:.3f} %, "
                        f"Δp mean {100 * b['mean_dp']:.3f} % rms {100 * b['rms_dp']:.3f} %, "
                        f"PPL(Q)/PPL(base) {b['ppl_ratio']:.6f}")
