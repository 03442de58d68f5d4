"""Every command takes every checkpoint kind: `generate --model` and `eval --model` on a GGUF file give what they give
on the HF folder it was converted from (F32: the same weights and token ids), and on a LoRA adapter (its base named
in adapter_config.json) what they give on PEFT's merged checkpoint."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from driftscope.cli import main
from driftscope.engine.tokenizer import load_tokenizer
from driftscope.testing import random_checkpoint, write_tokenizer

gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent / "engine"))  # the test-side HF -> GGUF converter
from gguf_writer import Q, write_gguf  # noqa: E402

TEXTS = ["the cat sat on the mat", "a b c d e f g", "hello world this is some text", "Question: is it? Answer: yes"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    base = root / "base"
    write_tokenizer(base, TEXTS * 3, vocab_size=300)
    random_checkpoint(base, "llama", vocab_size=load_tokenizer(base).vocab_size, hidden_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, intermediate_size=64)  # llama: the GGUF q/k permutation
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    pm.save_pretrained(root / "adapter")
    cfg_file = root / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))  # its base, a local folder
    pm.merge_and_unload().save_pretrained(root / "merged", safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(base / f, root / "merged" / f)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t[:9]}) + "\n" for t in TEXTS))
    return {"root": root, "base": base, "gguf": write_gguf(base, root / "base.gguf", Q.F32),
            "adapter": root / "adapter", "merged": root / "merged", "prompts": prompts}


def _generate(kinds, model: Path, name: str) -> list[dict]:
    out = kinds["root"] / f"{name}.jsonl"
    assert main(["generate", "--model", str(model), "--data", str(kinds["prompts"]), "--out", str(out),
                 "--max-new-tokens", "8", "--no-progress"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_on_a_gguf_equals_its_hf_folder(kinds):
    ref = _generate(kinds, kinds["base"], "hf")
    got = _generate(kinds, kinds["gguf"], "gguf")
    assert [r["output_token_ids"] for r in got] == [r["output_token_ids"] for r in ref]
    assert [r["output"] for r in got] == [r["output"] for r in ref]
    assert len({tuple(r["output_token_ids"]) for r in ref}) > 1  # not one degenerate answer


def test_generate_on_an_adapter_equals_peft_merged(kinds):
    ref = _generate(kinds, kinds["merged"], "merged")
    got = _generate(kinds, kinds["adapter"], "adapter")
    assert [r["output_token_ids"] for r in got] == [r["output_token_ids"] for r in ref]
    assert [r["output_token_ids"] for r in ref] != [r["output_token_ids"] for r in _generate(kinds, kinds["base"], "b")]


def test_eval_on_a_gguf_and_an_adapter(kinds, shared_data):
    bench = shared_data / "benchmarks"
    scores = {}  # per kind: every doc's log-likelihood responses, in order
    for name in ("base", "gguf", "adapter", "merged"):
        out = kinds["root"] / f"eval-{name}"
        assert main(["eval", "--model", str(kinds[name]), "--tasks", "mctaco", "--data-dir", str(bench), "--limit",
                     "8", "--out", str(out)]) == 0
        samples = sorted((out / "samples").rglob("*.jsonl"))
        scores[name] = [json.loads(line).get("resps") for f in samples for line in f.read_text().splitlines()]
    assert scores["gguf"] == scores["base"] and scores["adapter"] == scores["merged"]
    assert scores["base"] and scores["adapter"] != scores["base"]


def test_unusable_adapter_base_is_one_line(kinds, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(kinds["adapter"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/some-hub-model"}))
    assert main(["generate", "--model", str(adapter), "--data", str(kinds["prompts"]), "--out",
                 str(tmp_path / "r.jsonl"), "--max-new-tokens", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model {adapter} is a LoRA adapter whose base 'org/some-hub-model'" in err
