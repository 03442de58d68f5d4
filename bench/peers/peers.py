"""Each peer of each workload: the commands one run of it is (whole processes, as users run them) and what its
output says (scored tokens, KL, decode rate ...). Every tool gets the same thread count: OMP_NUM_THREADS for the
Python ones (torch, driftscope), `-t`/`-tb` for llama.cpp."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.peers import workloads as w

PY = sys.executable
DS = str(Path(sys.executable).with_name("driftscope"))


@dataclass(frozen=True)
class Peer:
    name: str
    commands: Callable[[dict, Path], list[list[str]]]  # (context, fresh work folder) -> argv of each process
    parse: Callable[[list[str], Path], dict]  # (each process's stdout + stderr, work folder) -> metrics


def _json_line(outs: list[str], _: Path) -> dict:
    return json.loads([ln for ln in outs[-1].splitlines() if ln.startswith("{")][-1])


# ---- drift ---------------------------------------------------------------------------------------------------------
def _ds_drift(c: dict, wd: Path) -> list[list[str]]:
    tuned = [x for t in c["tuned"] for x in ("--tuned", str(t))]
    return [[DS, "drift", "--base", str(c["base"]), *tuned, "--data", str(c["records"]), "--out", str(wd / "out"),
             "--max-seq-len", str(w.DRIFT_MAX_TOKENS), "--no-progress"]]


def _ds_drift_parse(_: list[str], wd: Path) -> dict:
    s = json.loads((wd / "out" / "summary.json").read_text())
    tasks = [t for m in s["models"].values() for t in m["tasks"].values()]
    return {"scored": sum(t["tokens"] for t in tasks), "kl_tb": [t["kl_tb"]["token_mean"] for t in tasks],
            "stages": s["timing"].get("stages"), "timing_s": s["timing"].get("seconds")}


def _hf_drift(way: str) -> Callable[[dict, Path], list[list[str]]]:
    return lambda c, wd: [[PY, "-m", "bench.peers.hf_drift", way, str(c["base"]), *map(str, c["tuned"]),
                           str(c["records"])]]


def _hf_drift_parse(outs: list[str], wd: Path) -> dict:
    d = _json_line(outs, wd)
    d["scored"] *= max(len(d.get("kl_tb") or d.get("sampled_kl")), 1)  # pair-tokens: J tuned models score each
    return d


def _hf_drift_each(way: str) -> Callable[[dict, Path], list[list[str]]]:
    """One transformers process per tuned model (base forwarded J times): J separate passes, as a user runs them."""
    return lambda c, wd: [[PY, "-m", "bench.peers.hf_drift", way, str(c["base"]), str(t), str(c["records"])]
                          for t in c["tuned"]]


def _hf_drift_each_parse(outs: list[str], wd: Path) -> dict:
    runs = [_hf_drift_parse([o], wd) for o in outs]
    return {"scored": sum(r["scored"] for r in runs), "kl_tb": [k for r in runs for k in r["kl_tb"]],
            "kl_bt": [k for r in runs for k in r["kl_bt"]]}


def _llama_kl(c: dict, wd: Path) -> list[list[str]]:
    common = ["-f", str(c["text"]), "-c", str(w.LLAMA_CTX), "-b", str(w.LLAMA_CTX), *c["llama_threads"],
              "--kl-divergence-base", str(wd / "base-logits.bin")]
    return [[c["bins"]["llama-perplexity"], "-m", str(c["base_gguf"]), *common]] + [
        [c["bins"]["llama-perplexity"], "-m", str(g), *common, "--kl-divergence"] for g in c["tuned_gguf"]]


def _llama_kl_parse(outs: list[str], _: Path) -> dict:
    chunks = int(re.search(r"over (\d+) chunks", outs[0]).group(1))
    per = w.LLAMA_CTX - 1 - w.LLAMA_CTX // 2  # tokens scored per chunk: the second half, after the first
    kl = [float(re.search(r"Mean\s+KLD:\s+([-\d.e]+)", o).group(1)) for o in outs[1:]]
    return {"scored": chunks * per * len(kl), "chunks": chunks, "kl_tb": kl}


DRIFT = [Peer("driftscope", _ds_drift, _ds_drift_parse), Peer("transformers full logits", _hf_drift("full"),
                                                                 _hf_drift_parse),
         Peer("transformers sampled log-probs", _hf_drift("sampled"), _hf_drift_parse),
         Peer("llama.cpp KL mode", _llama_kl, _llama_kl_parse)]


# ---- generate ------------------------------------------------------------------------------------------------------
def _ds_generate(c: dict, wd: Path) -> list[list[str]]:
    return [[DS, "generate", "--model", str(c["base"]), "--data", str(c["prompts"]), "--out", str(wd / "out.jsonl"),
             "--chat", "--ignore-eos", "--max-new-tokens", str(w.GEN_NEW_TOKENS), "--temperature", "0",
             "--no-progress"]]


def _ds_generate_parse(_: list[str], wd: Path) -> dict:
    rows = w.read_jsonl(wd / "out.jsonl")
    return {"new_tokens": sum(len(r["output_token_ids"]) for r in rows),
            "first": rows[0]["output_token_ids"][:8]}


def _hf_generate(c: dict, _: Path) -> list[list[str]]:
    return [[PY, "-m", "bench.peers.hf_generate", str(c["base"]), str(c["prompts"]), str(w.GEN_NEW_TOKENS)]]


def _ds_decode(c: dict, _: Path) -> list[list[str]]:
    return [[PY, "-m", "bench.peers.ds_decode", str(c["base"]), str(c["prompts"]), str(w.GEN_NEW_TOKENS)]]


def _llama_batched(c: dict, _: Path) -> list[list[str]]:
    n = w.GEN_NEW_TOKENS
    return [[c["bins"]["llama-batched-bench"], "-m", str(c["base_gguf"]), "-c", str(w.GEN_PROMPTS * 2 * n + 64),
             "-b", "2048", "-ub", "512", "-npp", str(n), "-ntg", str(n), "-npl", str(w.GEN_PROMPTS),
             *c["llama_threads"]]]


def _llama_batched_parse(outs: list[str], _: Path) -> dict:
    # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
    for line in outs[0].splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2] == str(w.GEN_PROMPTS):
            v = [float(x) for x in cells]
            return {"prefill_tok_s": v[5], "decode_tok_s": v[7], "bench_s": v[8], "new_tokens": int(v[1] * v[2])}
    raise ValueError("llama-batched-bench printed no row for B = %d" % w.GEN_PROMPTS)


GENERATE = [Peer("driftscope", _ds_generate, _ds_generate_parse), Peer("transformers", _hf_generate, _json_line),
            Peer("llama.cpp batched-bench", _llama_batched, _llama_batched_parse),
            Peer("driftscope decode (in-process)", _ds_decode, _json_line)]


# ---- eval ----------------------------------------------------------------------------------------------------------
def _ds_eval(c: dict, wd: Path) -> list[list[str]]:
    return [[DS, "eval", "--model", str(c["base"]), "--tasks", ",".join(w.EVAL_TASKS), "--limit", str(w.EVAL_LIMIT),
             "--data-dir", str(w.BENCHMARKS), "--out", str(wd / "out"), "--device", "cpu", "--dtype", "float32"]]


def _lm_eval(c: dict, wd: Path) -> list[list[str]]:
    return [[PY, "-m", "bench.peers.lm_eval_hf", str(c["base"]), str(w.BENCHMARKS), str(w.EVAL_LIMIT),
             str(wd / "out"), *w.EVAL_TASKS]]


def _eval_samples(_: list[str], wd: Path) -> dict:
    root = wd / "out" / "samples" if (wd / "out" / "samples").is_dir() else wd / "out"
    docs = {b: sorted(w.read_jsonl(root / f"{b}.jsonl"), key=lambda s: s["doc_id"]) for b in w.EVAL_TASKS}
    return {"docs": {b: [{"doc_id": s["doc_id"], "arguments": s["arguments"],
                          "ll": [r[0][0] for r in s["resps"]], "acc": s["acc"]} for s in d] for b, d in docs.items()},
            "requests": sum(len(s["resps"]) for d in docs.values() for s in d)}


EVAL = [Peer("driftscope", _ds_eval, _eval_samples), Peer("lm-eval hf", _lm_eval, _eval_samples)]

DRIFT4 = [DRIFT[0], DRIFT[1], Peer("transformers full logits, J passes", _hf_drift_each("full"), _hf_drift_each_parse)]

WORKLOADS = {"drift": DRIFT, "drift4": DRIFT4, "generate": GENERATE, "eval": EVAL}
