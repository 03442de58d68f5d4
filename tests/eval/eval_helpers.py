"""Eval test helpers: a tiny Qwen3 checkpoint with a tokenizer, and local lm-eval task files written on the spot."""
from __future__ import annotations

import json
from pathlib import Path

from driftscope.testing import random_checkpoint, write_tokenizer

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. Two plus two is four.",
    "Question: what colour is the sky? Answer: blue. Question: what is ice made of? Answer: water.",
    "A cat sat on the mat while the dog slept by the door, and the bird sang in the tree.",
] * 10

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " blue"], "label": 0},
    {"question": "Two plus two is", "choices": [" four", " water", " the mat"], "label": 0},
    {"question": "What colour is the sky? Answer:", "choices": [" blue", " Paris"], "label": 0},
    {"question": "The dog slept by the", "choices": [" door", " tree", " capital of Italy"], "label": 0},
    {"question": "Ice is made of", "choices": [" water", " a cat"], "label": 0},
]


def write_model(root: Path, *, seed: int = 3, vocab: int = 340, std: float | None = None) -> Path:
    write_tokenizer(root, CORPUS, vocab_size=vocab)
    random_checkpoint(root, "qwen3", vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, seed=seed)
    return root


def write_tasks(root: Path) -> Path:
    """A multiple-choice, a generation and a rolling-perplexity task over a local JSONL file, as lm-eval YAML."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n")
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{choices[label]}}'\ngeneration_kwargs:\n  until: ['.']\n"
        "  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    (root / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: '{{question}}{{choices[0]}}'\n"
        "doc_to_target: '{{question}}{{choices[0]}}'\nmetric_list:\n  - metric: word_perplexity\n", encoding="utf-8")
    return root
