"""A results file of bench.peers.run as the markdown rows recorded in bench/RESULTS.md.

    python -m bench.peers.report bench/.cache/peers/results-*.json
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _med(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def rows(wl: str, entry: dict) -> list[str]:
    out = []
    ratios = entry.get("ratios", {})
    for name, rs in entry["runs"].items():
        s = _med([r["seconds"] for r in rs])
        rate = "—"
        if "scored" in rs[0]:
            rate = "%.1f" % statistics.median(r["scored"] / r["seconds"] for r in rs)
        extra = []
        for k in ("decode_tok_s", "prefill_tok_s"):
            if k in rs[0]:
                extra.append(f"{k.split('_')[0]} {statistics.median(r[k] for r in rs):.1f} tok/s")
        if "kl_tb" in rs[0]:
            extra.append("KL " + ", ".join(f"{x:.6f}" for x in rs[-1]["kl_tb"]))
        if "sampled_kl" in rs[0]:
            extra.append("sampled KL " + ", ".join(f"{x:.6f}" for x in rs[-1]["sampled_kl"]))
        r = ratios.get(name)
        vs = "—" if r is None else "; ".join(
            f"{k} {v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})" for k, v in r.items())
        rss = statistics.median(r["peak_rss_mb"] for r in rs)
        out.append(f"| {wl} | {name} | {s[0]:.1f} ({s[1]:.1f}–{s[2]:.1f}) | {rate} | {rss:.0f} | {vs} | "
                   f"{'; '.join(extra)} |")
    return out


def _fmt(v: dict) -> str:
    return f"{v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})"


def _paired(entry: dict, a: str, b: str, key: str) -> str:
    xs = [x[key] / y[key] for x, y in zip(entry["runs"][a], entry["runs"][b])]
    return _fmt(dict(zip(("median", "min", "max"), _med(xs))))


def acceptance(wls: dict) -> list[str]:
    """The ratios issue [13]'s acceptance list names, from whichever workloads ran (> 1: driftscope better)."""
    out = []
    for name, entry in wls.items():
        r = entry.get("ratios", {})
        if name == "drift":
            for peer in ("transformers full logits", "llama.cpp KL mode", "transformers sampled log-probs"):
                if peer in r:
                    out.append(f"drift scored tok/s vs {peer}: {_fmt(r[peer]['scored_rate'])}")
            if "transformers full logits" in r:
                out.append(f"drift peak RSS driftscope / transformers full logits: "
                           f"{_fmt(r['transformers full logits']['rss'])}")
        if name == "drift4" and "transformers full logits" in r:
            out.append(f"J = 4 vs transformers full logits of 4 tuned models in one process (base forward shared): "
                       f"{_fmt(r['transformers full logits']['time'])}")
            if "transformers full logits, J passes" in r:
                out.append("J = 4 vs four separate transformers full-logits passes (paired rounds): "
                           f"{_fmt(r['transformers full logits, J passes']['time'])}")
            elif "drift" in wls:
                four = 4 * statistics.median(x["seconds"] for x in wls["drift"]["runs"]["transformers full logits"])
                ds4 = statistics.median(x["seconds"] for x in entry["runs"]["driftscope"])
                out.append(f"J = 4 vs four separate transformers full-logits passes (4 × the drift median, unpaired): "
                           f"{four / ds4:.2f}×")
        if name == "generate":
            runs = entry["runs"]
            if "driftscope decode (in-process)" in runs and "llama.cpp batched-bench" in runs:
                out.append("decode tok/s vs llama.cpp batched decode at 16 sequences: " + _paired(
                    entry, "driftscope decode (in-process)", "llama.cpp batched-bench", "decode_tok_s"))
            if "transformers" in r:
                out.append(f"whole-process generation vs transformers: {_fmt(r['transformers']['time'])}")
        if name == "eval" and "lm-eval hf" in r:
            out.append(f"eval vs lm-eval hf: {_fmt(r['lm-eval hf']['time'])}; per-doc equal: "
                       f"{entry['per_doc']['equal']}")
    return out


def main(paths: list[str]) -> None:
    print("| workload | tool | seconds, median (min–max) | scored tok/s | peak RSS MB | driftscope vs tool: "
          "time, scored rate, RSS (median of paired rounds, min–max) | notes |")
    print("|---|---|---|---|---|---|---|")
    loads, wls = [], {}
    for p in paths:
        res = json.loads(Path(p).read_text())
        wls.update(res["workloads"])
        for wl, entry in res["workloads"].items():
            print("\n".join(rows(wl, entry)))
            loads.append(f"{wl}: " + ", ".join(f"{a:.2f}→{b:.2f}" for a, b in entry["loads"]))
            if "per_doc" in entry:
                loads.append(f"{wl} per-doc: {json.dumps(entry['per_doc'])}")
    print("\n" + "\n".join(loads))
    print("\n" + "\n".join(acceptance(wls)))


if __name__ == "__main__":
    main(sys.argv[1:])
