"""Greedy generation on real weights: driftscope's engine on the GGUF (continuous batching, paged KV cache) against
transformers' `generate` on the HF checkpoint of the same file, token for token, on real chat prompts."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.real

NEW_TOKENS = 32


def _prompts(shared_data) -> list[list[dict]]:
    b = shared_data / "benchmarks"

    def first(name: str, key: str, i: int = 0) -> str:
        return json.loads((b / name).read_text(encoding="utf-8").splitlines()[i])[key]

    texts = [first("math500.jsonl", "problem"), first("ifeval_input_data.jsonl", "prompt", 1),
             first("headqa_en_test.jsonl", "qtext", 2), first("aime24.jsonl", "problem")]
    # and one the model answers within NEW_TOKENS, so that the EOS path is compared as well
    return [[{"role": "user", "content": t}] for t in texts] + [
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]]


def test_greedy_generation_equals_transformers(smollm2_gguf, hf_model, hf_tokenizer, shared_data):
    import driftscope

    prompts = _prompts(shared_data)
    gens = driftscope.generate(smollm2_gguf, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, chat=True,
                               progress=False)  # model and tokenizer from the GGUF file
    assert [g.index for g in gens] == list(range(len(prompts)))
    eos = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for g, messages in zip(gens, prompts):
        ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert g.prompt_token_ids == list(ids)  # the same rendered prompt, the same ids
        with torch.inference_mode():
            out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                    eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
        ref = out[: out.index(eos) + 1] if eos in out else out  # up to and with the EOS, as driftscope keeps it
        assert g.token_ids == ref, (hf_tokenizer.decode(g.token_ids), hf_tokenizer.decode(ref))
        assert g.finish_reason == ("eos" if ref[-1] == eos else "length")
        assert g.text == hf_tokenizer.decode(ref, skip_special_tokens=True)
    assert {g.finish_reason for g in gens} == {"eos", "length"}  # both ends compared (measured: 4 length, 1 eos)
