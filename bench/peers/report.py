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


def main(paths: list[str]) -> None:
    print("| workload | tool | seconds, median (min–max) | scored tok/s | peak RSS MB | driftscope vs tool: "
          "time, scored rate, RSS (median of paired rounds, min–max) | notes |")
    print("|---|---|---|---|---|---|---|")
    loads = []
    for p in paths:
        res = json.loads(Path(p).read_text())
        for wl, entry in res["workloads"].items():
            print("\n".join(rows(wl, entry)))
            loads.append(f"{wl}: " + ", ".join(f"{a:.2f}→{b:.2f}" for a, b in entry["loads"]))
            if "per_doc" in entry:
                loads.append(f"{wl} per-doc: {json.dumps(entry['per_doc'])}")
    print("\n" + "\n".join(loads))


if __name__ == "__main__":
    main(sys.argv[1:])
