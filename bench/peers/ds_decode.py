"""driftscope's decode rate on the generation workload, in one process: the model loaded once, one warm-up, then
`generate` of 1 and of NEW_TOKENS new tokens (EOS ignored) for every prompt; decode tok/s =
prompts·(NEW_TOKENS − 1) / (t_NEW − t_1): what llama-batched-bench's S_TG measures (the prefill cancels out).
OpenMP's wait policy is the `driftscope` command's (cli.passive_openmp, before torch loads): under libgomp's default
spin torch's idle threads compete with the decode pool's worker (bench/RESULTS.md).

    python -m bench.peers.ds_decode MODEL PROMPTS NEW_TOKENS
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.peers.workloads import read_jsonl


def main(model_path: str, prompts: str, new_tokens: int) -> dict:
    from driftscope.cli import passive_openmp

    passive_openmp()
    import driftscope

    msgs = [r["messages"] for r in read_jsonl(Path(prompts))]
    model = driftscope.load_model(model_path, device="cpu", dtype="float32")
    kw = dict(tokenizer=model_path, temperature=0.0, chat=True, ignore_eos=True, progress=False)
    driftscope.generate(model, msgs[:2], max_new_tokens=4, **kw)  # warm-up
    t = {}
    for n in (1, new_tokens):
        t0 = time.perf_counter()
        gens = driftscope.generate(model, msgs, max_new_tokens=n, **kw)
        t[n] = time.perf_counter() - t0
        assert all(len(g.token_ids) == n for g in gens), [len(g.token_ids) for g in gens]
    prompt_tokens = sum(len(g.prompt_token_ids) for g in gens)
    return {"decode_tok_s": len(msgs) * (new_tokens - 1) / (t[new_tokens] - t[1]), "prefill_s": t[1],
            "prompt_tokens": prompt_tokens, "generate_s": t[new_tokens]}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
