"""Greedy generation with transformers: the chat prompts in one left-padded batch, `generate` with a fixed number
of new tokens (EOS ignored), inference mode. Prints one JSON line (new tokens, prompt tokens, generate's seconds).

    python -m bench.peers.hf_generate MODEL PROMPTS NEW_TOKENS
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from bench.peers.workloads import read_jsonl


@torch.inference_mode()
def main(model_path: str, prompts: str, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
             for r in read_jsonl(Path(prompts))]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    seconds = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    return {"new_tokens": int(new.numel()), "prompt_tokens": int(enc["attention_mask"].sum()),
            "generate_s": seconds, "first": new[0, :8].tolist()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
