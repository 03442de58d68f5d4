"""The workloads of issue [13]'s table, as files every peer reads (written once into bench/.cache/peers/).

- drift: the first 32 real MATH500 responses ({input, output} records), each cut to its first 256 tokens
  (prompt + response, tokenized separately as driftscope does); for llama.cpp the same cut texts joined into one
  text file, which `llama-perplexity` reads as chunks of 512 tokens (it scores the second half of each).
- generate: the first 16 MATH500 problems as chat messages, 128 new tokens each, greedy, EOS ignored.
- eval: the log-likelihood benchmarks MC-TACO and HEAD-QA, the first EVAL_LIMIT docs of each, chat template on.
"""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
ROOT = REPO / "bench" / ".cache" / "peers"
MATH_RESPONSES = DATA / "responses" / "UniReason-RL_hendrycks_math_500.jsonl"
BENCHMARKS = DATA / "benchmarks"

DRIFT_RECORDS, DRIFT_MAX_TOKENS = 32, 256
LLAMA_CTX = 512  # llama-perplexity's chunk: it scores tokens LLAMA_CTX/2 .. LLAMA_CTX-1 of each
GEN_PROMPTS, GEN_NEW_TOKENS = 16, 128
EVAL_TASKS, EVAL_LIMIT = ("mctaco", "headqa"), 20


def _lines(path: Path, n: int) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[:n]


def cut_ids(tokenizer, record: dict, max_tokens: int = DRIFT_MAX_TOKENS) -> tuple[list[int], int]:
    """(the record's first max_tokens ids, its number of prompt ids): prompt and response encoded separately
    without special tokens, as driftscope's tokenize_records does."""
    p = tokenizer.encode(record["input"], add_special_tokens=False)
    r = tokenizer.encode(record["output"], add_special_tokens=False)
    return (p + r)[:max_tokens], len(p)


def drift_records() -> Path:
    out = ROOT / f"drift-{DRIFT_RECORDS}.jsonl"
    if not out.is_file():
        ROOT.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(_lines(MATH_RESPONSES, DRIFT_RECORDS)) + "\n", encoding="utf-8")
    return out


def drift_text(hf_folder: Path) -> Path:
    """The cut records decoded back to text and joined by newlines, for llama-perplexity -f."""
    out = ROOT / f"drift-{DRIFT_RECORDS}-cut{DRIFT_MAX_TOKENS}.txt"
    if not out.is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf_folder)
        texts = [tok.decode(cut_ids(tok, json.loads(line))[0]) for line in _lines(drift_records(), DRIFT_RECORDS)]
        out.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return out


def gen_prompts() -> Path:
    out = ROOT / f"prompts-{GEN_PROMPTS}.jsonl"
    if not out.is_file():
        ROOT.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in _lines(BENCHMARKS / "math500.jsonl", GEN_PROMPTS)]
        out.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["problem"]}]}) + "\n"
                               for r in rows), encoding="utf-8")
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
