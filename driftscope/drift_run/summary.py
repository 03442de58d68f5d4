"""Shapes the probes' finalize() dicts into summary.json's per-task and per-model blocks (the report's contract).
A task's means are token_metrics.MEANS, each {token_mean, sample_mean}; "llama_cpp" is KLDStats.finalize() (llama.cpp's
--kl-divergence statistics, base = the reference)."""
from __future__ import annotations

from driftscope.probes.token_metrics import MEANS, mean_of_task_means
from driftscope.util import json_float


def metric_block(tokens: dict) -> dict:
    """The output probe's keys of one TokenMetrics.finalize(): tokens, samples, each of MEANS {token_mean,
    sample_mean}, sampled_kl, top1_agreement (a task's block and each logit-lens entry)."""
    return {"tokens": tokens["tokens"], "samples": tokens["samples"],
            **{m: {"token_mean": tokens["token_mean"][m], "sample_mean": tokens["sample_mean"][m]} for m in MEANS},
            "sampled_kl": tokens["sampled_kl"]["value"], "top1_agreement": tokens["token_mean"]["top1_agree"]}


def lens_summary(lens: dict) -> dict:
    """probes.lens.LensDrift.finalize() -> summary.json's "lens" (cross: base vs tuned per index), "self_lens"
    ({"base", "tuned"}: each model's lens at the index as "tuned" against its own output as "base", so kl_bt is
    KL(output ‖ lens)) and "promoted_tokens" (per index, top promoted / suppressed ids of W_base·(γ ⊙ Δμ))."""
    rows = lambda entries: [{"index": e["index"], **metric_block(e)} for e in entries]
    return {"lens": rows(lens["lens"]),
            "self_lens": {who: rows(entries) for who, entries in lens["self_lens"].items()},
            "promoted_tokens": lens.get("promoted")}


def task_summary(*, tokens: dict, hidden: dict, shifted: dict, pca: dict | None, problems: list[str],
                 llama_cpp: dict | None = None, lens: dict | None = None, examples: dict | None = None) -> dict:
    """A task's block; with `lens` (LensDrift.finalize()) also lens_summary's keys; with `examples`
    (TopExamples.finalize()) "examples"."""
    by_layer: dict[int, dict] = {}
    if pca is not None:
        for r in pca["records"]:
            row = by_layer.setdefault(r["layer"], {})
            if r["state"] == "Updated":
                row["pca_shift"], row["pca_principle_tuned"] = r["shift"], r["principle"]
            else:
                row["pca_principle_base"] = r["principle"]
    layers = []
    for h in hidden["layers"]:
        p = by_layer.get(h["layer"], {})
        layers.append({
            "layer": h["layer"], "cosine": h["cos_mean"], "rel_l2": h["rel_l2_mean"],
            "rel_l2_fro": h["rel_l2_fro"], "cka": h["cka"],
            "pca_shift": p.get("pca_shift"), "pca_principle_base": p.get("pca_principle_base"),
            "pca_principle_tuned": p.get("pca_principle_tuned"),
        })
    return {
        **metric_block(tokens),
        "llama_cpp": llama_cpp,
        "layers": layers,
        "pca": pca,
        "cka_mode": hidden["cka_mode"],
        "histograms": tokens["histograms"],
        "shifted_tokens": shifted,
        "token_metrics": {k: tokens[k] for k in ("sampled_kl", "rank_shift_paper_tokens")},
        "problems": problems,
        **(lens_summary(lens) if lens is not None else {}),
        **({"examples": examples} if examples is not None else {}),
    }


def model_summary(path: str, tasks: dict[str, dict]) -> dict:
    per_task = {name: {mean: {"rank_shift": v} for mean, v in t["rank_shift"].items()} for name, t in tasks.items()}
    return {
        "path": path,
        "rank_shift_mean_of_task_means": json_float(mean_of_task_means(per_task, "rank_shift", "token_mean")),
        "rank_shift_mean_of_task_sample_means": json_float(mean_of_task_means(per_task, "rank_shift", "sample_mean")),
        "tasks": tasks,
    }


def generation_summary(rows: list[dict]) -> dict:
    """Drift while generating: how the tuned model's responses ended and how long they were."""
    reasons: dict[str, int] = {}
    for r in rows:
        reasons[r["finish_reason"]] = reasons.get(r["finish_reason"], 0) + 1
    n = [len(r["output_token_ids"]) for r in rows]
    return {"responses": len(rows), "finish_reasons": reasons, "generated_tokens": sum(n),
            "mean_tokens": sum(n) / len(n) if n else None, "max_tokens": max(n, default=None)}


def mark_nonfinite(task: dict, bad_tokens: int, dtype: str) -> dict:
    """Scored tokens whose logits were NaN/Inf (an overflow in the forward pass) make every token mean of `task`
    null, never a number averaged over garbage, with a problem entry that counts them; a mean that is null for
    another reason (non-finite hidden states) gets a problem entry too. Returns `task`, changed in place."""
    if bad_tokens:
        for m in MEANS:
            task[m] = {"token_mean": None, "sample_mean": None}
        task["sampled_kl"] = task["top1_agreement"] = None
        task["problems"].append(
            f"{bad_tokens} of {task['tokens']} scored tokens gave non-finite logits (NaN/Inf, e.g. an overflow in the "
            f"{dtype} forward pass): the token means are null; histograms and shifted tokens leave those tokens out")
    elif task["tokens"] and (nulls := [m for m in ("kl_tb", "kl_bt") if task[m]["token_mean"] is None]):
        task["problems"].append(f"non-finite per-token results (NaN/Inf, e.g. an overflow in the {dtype} forward "
                                f"pass): {', '.join(nulls)} null")
    layers = [lay["layer"] for lay in task["layers"] if lay["cosine"] is None or lay["rel_l2"] is None]
    if task["tokens"] and layers:
        task["problems"].append(f"non-finite hidden states (NaN/Inf, e.g. an overflow in the {dtype} forward pass): "
                                f"cosine / rel_l2 of layers {layers} are null")
    return task
