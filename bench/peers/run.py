"""The real-weights peer benchmark (issue [13]): driftscope against transformers, llama.cpp and lm-eval on the same
work, whole processes (load included), interleaved rounds, equal thread counts.

    python -m bench.peers.run [--workloads drift,drift4,generate,eval] [--rounds 3] [--threads 2] [--check]
        [--only NAMES] [--skip NAME ...]

Round r runs every peer of a workload once, in list order when r is even and reversed when odd (A B, B A, ...), so a
drift of the machine's speed falls on both sides alike. Per peer: wall seconds of its processes (summed), peak RSS
(the largest ru_maxrss of its processes, from wait4), and what its output says (scored tokens, KL, decode rate).
Per pair (driftscope, peer): the median of the per-round ratios peer seconds / driftscope seconds with their
min–max, and the same for scored tokens/s where the two score different token counts. The 1-minute load average is
recorded before and after each round; a round that starts with the load above the core count is flagged LOADED. So is
the machine's float32 GEMM rate (bench/peers/gemm_rate.py, ~2 s): a round whose rate moved by more than 15% is
flagged RATE MOVED (a shared VM's second vCPU can stop adding throughput within minutes).
--check runs each peer once and prints what it measured (no ratios). Results: bench/.cache/peers/results-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.peers import llamacpp, weights
from bench.peers import workloads as w
from bench.peers.peers import WORKLOADS, Peer


def context(workload: str, threads: int) -> dict:
    j = 4 if workload == "drift4" else 1
    p = weights.pair(j)
    c = {**p, "records": w.drift_records(), "prompts": w.gen_prompts(), "text": w.drift_text(p["base"]),
         "llama_threads": ["-t", str(threads), "-tb", str(threads)]}
    if workload in ("drift", "generate"):
        c["bins"] = llamacpp.build()
    return c


def machine() -> dict:
    """CPU model, cores, RAM, the versions of every tool, driftscope's git revision."""
    import importlib.metadata as md

    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name:")), "?")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=w.REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "driftscope", "csrc"], cwd=w.REPO, capture_output=True,
                           text=True).stdout.strip()
    info = llamacpp.cache_dir() / "build.json"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(ram, 1),
            "versions": {n: md.version(n) for n in ("torch", "transformers", "lm_eval", "driftscope")},
            "llama.cpp": json.loads(info.read_text()) if info.is_file() else None,
            "driftscope_rev": rev.stdout.strip() + (" + uncommitted changes" if dirty else "")}


def env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(w.REPO)}


def run_peer(peer: Peer, c: dict, wd: Path, threads: int) -> dict:
    """One run of `peer` in the fresh folder `wd`: seconds, peak RSS (MB), metrics."""
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    seconds, rss_kb, outs = 0.0, 0, []
    for i, cmd in enumerate(peer.commands(c, wd)):
        log = wd / f"proc{i}.log"
        with open(log, "w") as f:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(threads), cwd=w.REPO)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds += time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss_kb = max(rss_kb, usage.ru_maxrss)
        outs.append(log.read_text(errors="replace"))
        if proc.returncode != 0:
            raise RuntimeError(f"{peer.name}: `{' '.join(cmd)}` exited {proc.returncode}:\n{outs[-1][-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": rss_kb / 1024, **peer.parse(outs, wd)}


def gemm_rate(threads: int) -> float:
    """The machine's float32 GEMM rate (GFLOP/s) on `threads` threads now, from a fresh process."""
    out = subprocess.run([sys.executable, "-m", "bench.peers.gemm_rate"], env=env(threads), cwd=w.REPO,
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["gflops"])


def ratios(runs: dict[str, list[dict]], base: str = "driftscope") -> dict[str, dict]:
    """Per peer (not driftscope's own other measurements): median and min–max of peer seconds / driftscope seconds
    (> 1: driftscope faster), of driftscope's scored tok/s over the peer's where both report scored tokens, and of
    peak RSS driftscope / peer (< 1: driftscope smaller)."""
    out = {}
    for name, rs in runs.items():
        if name.startswith(base):  # driftscope itself, or another measurement of it
            continue
        pairs = list(zip(runs[base], rs))
        r = {"time": [p["seconds"] / d["seconds"] for d, p in pairs],
             "rss": [d["peak_rss_mb"] / p["peak_rss_mb"] for d, p in pairs]}
        if all("scored" in x for x in (*runs[base], *rs)):
            r["scored_rate"] = [(d["scored"] / d["seconds"]) / (p["scored"] / p["seconds"]) for d, p in pairs]
        out[name] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
                     for k, v in r.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="drift,drift4,generate,eval")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="one round, no ratios: does every peer run?")
    ap.add_argument("--only", default="", help="comma-separated peer names to keep (driftscope always runs)")
    ap.add_argument("--skip", action="append", default=[], metavar="PEER",
                    help="a peer's exact name not to run (repeatable; unlike --only's, a name may hold commas)")
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    result = {"started_utc": stamp, "threads": a.threads, "cores": cores, "machine": machine(), "workloads": {}}
    print(json.dumps(result["machine"]), flush=True)
    out_json = w.ROOT / f"results-{stamp}.json"
    for wl in a.workloads.split(","):
        peers = [p for p in WORKLOADS[wl] if (not a.only or p.name == "driftscope" or p.name in a.only.split(","))
                 and p.name not in a.skip]
        c = context(wl, a.threads)
        runs: dict[str, list[dict]] = {p.name: [] for p in peers}
        loads, rates = [], []
        for r in range(1 if a.check else a.rounds):
            before, rate0 = os.getloadavg()[0], gemm_rate(a.threads)
            flag = " LOADED (load above the core count)" if before > cores else ""
            for p in peers if r % 2 == 0 else peers[::-1]:
                res = run_peer(p, c, w.ROOT / "work" / wl / p.name.replace(" ", "_"), a.threads)
                runs[p.name].append(res)
                brief = {k: v for k, v in res.items() if k not in ("docs", "stages")}
                print(f"[{wl} round {r}] {p.name}: {json.dumps(brief)}", flush=True)
            after, rate1 = os.getloadavg()[0], gemm_rate(a.threads)
            loads.append((before, after))
            rates.append((rate0, rate1))
            if abs(rate1 - rate0) > 0.15 * max(rate0, rate1):
                flag += " RATE MOVED (GEMM rate changed by more than 15%)"
            print(f"[{wl} round {r}] load {before:.2f} -> {after:.2f} on {cores} cores, GEMM {rate0:.0f} -> "
                  f"{rate1:.0f} GFLOP/s on {a.threads} threads{flag}", flush=True)
        entry = {"runs": runs, "loads": loads, "gemm_gflops": rates}
        if not a.check:
            entry["ratios"] = ratios(runs)
        if wl == "eval":
            entry["per_doc"] = eval_equal(runs)
        result["workloads"][wl] = entry
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1, default=str))
        summarize(wl, entry)
    print(f"results: {out_json}")


def eval_equal(runs: dict[str, list[dict]], tol: float = 5e-4) -> dict:
    """driftscope's last eval round against lm-eval hf's, doc by doc: same requests, log-likelihoods within tol,
    same per-doc acc (a near tie, best two within 2·tol, is counted, not compared)."""
    a, b = runs["driftscope"][-1]["docs"], runs["lm-eval hf"][-1]["docs"]
    worst, ties, acc_diff, arg_diff = 0.0, 0, 0, 0
    for bench in a:
        for x, y in zip(a[bench], b[bench], strict=True):
            arg_diff += x["arguments"] != y["arguments"]
            worst = max(worst, max(abs(p - q) for p, q in zip(x["ll"], y["ll"], strict=True)))
            top = sorted(y["ll"], reverse=True)
            if top[0] - top[1] <= 2 * tol:
                ties += 1
            else:
                acc_diff += x["acc"] != y["acc"]
    docs = sum(len(d) for d in a.values())
    return {"docs": docs, "max_abs_ll_diff": worst, "near_ties": ties, "acc_differs": acc_diff,
            "arguments_differ": arg_diff, "equal": worst <= tol and acc_diff == 0 and arg_diff == 0}


def summarize(wl: str, entry: dict) -> None:
    print(f"\n## {wl}")
    for name, rs in entry["runs"].items():
        s = [x["seconds"] for x in rs]
        rate = ""
        if "scored" in rs[0]:
            rate = f", {statistics.median(x['scored'] / x['seconds'] for x in rs):.1f} scored tok/s"
        extra = {k: rs[-1][k] for k in ("decode_tok_s", "prefill_tok_s", "kl_tb", "sampled_kl") if k in rs[-1]}
        print(f"  {name:32s} {statistics.median(s):8.2f} s ({min(s):.2f}–{max(s):.2f}){rate}, peak RSS "
              f"{statistics.median(x['peak_rss_mb'] for x in rs):.0f} MB {json.dumps(extra) if extra else ''}")
    for name, r in entry.get("ratios", {}).items():
        print("  driftscope vs " + name + ": " + "; ".join(
            f"{k} {v['median']:.2f}× ({v['min']:.2f}–{v['max']:.2f})" for k, v in r.items()))
    if "per_doc" in entry:
        print(f"  per-doc: {json.dumps(entry['per_doc'])}")


if __name__ == "__main__":
    sys.exit(main())
