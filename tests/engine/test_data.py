"""engine.data: record formats, bad-record reporting, scored positions/targets, truncation, packing."""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from driftscope.engine.data import Sample, pack_batches

from driftscope.records import FORMATS, detect_format, load_samples, read_records, skipped


class ByteTokenizer:
    """ids = UTF-8 bytes; a toy ChatML template."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, **kw):
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


TOK = ByteTokenizer()
RECORDS = [
    {"input": "Q: 2+2?\n", "output": "4"},
    {"prompt": "Say hi", "response": "hi there"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x?"},
                  {"role": "assistant", "content": "y."}]},
    {"text": "plain text, all scored"},
]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("rec", RECORDS, ids=list(FORMATS))
def test_formats_and_scored_positions(tmp_path, rec):
    f = write_jsonl(tmp_path / "r.jsonl", [json.dumps(rec)])
    samples, problems = load_samples(f, TOK)
    assert problems == [] and len(samples) == 1
    s = samples[0]
    fmt = detect_format(rec)
    prompt = {"input_output": rec.get("input"), "prompt_response": rec.get("prompt"), "text": "",
              "messages": TOK.apply_chat_template(rec.get("messages", [])[:-1])}[fmt]
    response = {"input_output": rec.get("output"), "prompt_response": rec.get("response"), "text": rec.get("text"),
                "messages": rec.get("messages", [{}])[-1].get("content")}[fmt]
    assert s.input_ids.tolist() == TOK.encode(prompt) + TOK.encode(response) and s.n_prompt == len(TOK.encode(prompt))
    b = pack_batches(samples, 10_000)[0]
    scored = torch.nonzero(b.score_mask).flatten().tolist()
    # the positions predicting response tokens: n_prompt-1 .. len-2 (with no prompt, the first token is unscored)
    first = max(s.n_prompt, 1) - 1
    assert scored == list(range(first, len(s.input_ids) - 1)), scored
    assert b.targets[b.score_mask].tolist() == s.input_ids[first + 1:].tolist()
    assert (b.targets[~b.score_mask] == -1).all()
    assert b.scored_first.tolist() == [True] + [False] * (len(scored) - 1)


def test_bad_lines_are_reported_with_file_and_line(tmp_path, caplog):
    lines = [
        json.dumps(RECORDS[0]),
        '{"input": "broken", "output": ',              # 2: invalid JSON
        json.dumps({"input": "only input"}),           # 3: no known field set
        json.dumps({"input": "q", "output": ""}),      # 4: empty output
        "",                                             # blank line: not a record
        json.dumps([1, 2]),                             # 6: not an object
        json.dumps({"prompt": "p", "response": 3}),    # 7: wrong type
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # 8: no assistant response
        json.dumps(RECORDS[1]),
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="driftscope.records"):
        records, problems = read_records(f)
    assert [r.where for r in records] == [f"{f}:1", f"{f}:9"]
    expected = {2: "invalid JSON", 3: "none of the field sets", 4: "'output' is empty", 6: "expected a JSON object",
                7: "'response' must be a string", 8: "last message must be the assistant"}
    assert len(problems) == len(expected), problems
    for (line, why), p in zip(expected.items(), problems):
        assert p.startswith(f"{f}:{line}: ") and why in p and p.endswith("record skipped"), p
    assert [r.getMessage() for r in caplog.records] == [skipped(problems)]  # one line, however many
    # sample ids are the record ordinals in the file (bad ones included), so they are stable
    assert [r.index for r in records] == [0, 7]


def test_line_splitting_is_jsonl_not_unicode(tmp_path):
    f = tmp_path / "u.jsonl"
    good = json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False).encode("utf-8")  # raw U+2028 / U+0085
    f.write_bytes(good + b"\n" + b'{"text": "\xff"}\r\n' + good + b"\r\n")
    records, problems = read_records(f)
    assert [r.where for r in records] == [f"{f}:1", f"{f}:3"] and records[0].response == "a\u2028b\x85c"
    assert problems == [f"{f}:2: not valid UTF-8 (byte 10 of the line); record skipped"], problems


def test_json_list_and_parquet(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(RECORDS + [{"nope": 1}]), encoding="utf-8")
    records, problems = read_records(f)
    assert [r.fmt for r in records] == list(FORMATS) and problems == [f"{f}[4]: " + problems[0].split(": ", 1)[1]]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "broken.json").write_text("[{\"text\": 1},", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json:1: invalid JSON list"):
        read_records(tmp_path / "broken.json")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "r.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            read_records(tmp_path / "r.parquet")


def test_truncation_and_unscorable(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [json.dumps({"prompt": "abcd", "response": "efgh"}),
                                           json.dumps({"prompt": "abcdefghij", "response": "k"}),
                                           json.dumps({"text": "z"})])
    samples, problems = load_samples(f, TOK, max_seq_len=6)
    assert len(samples) == 1 and samples[0].truncated and samples[0].input_ids.tolist() == TOK.encode("abcdef")
    assert samples[0].n_scored == 2  # predicts "e", "f"
    assert len(problems) == 2 and problems[0].startswith(f"{f}:2: prompt has 10 tokens") and f"{f}:3: " in problems[1]


def make_samples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length, n_prompt = rng.randint(2, 40), rng.randint(0, 10)
        out.append(Sample(i * 2 + 1, torch.randint(0, 255, (length,)), min(n_prompt, length - 1), f"s{i}"))
    return out


@pytest.mark.parametrize("budget", [1, 37, 100, 10_000])
def test_packing(budget):
    samples = make_samples(53)
    batches = pack_batches(samples, budget)
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)
    again = pack_batches(shuffled, budget)
    assert len(again) == len(batches)
    for a, b in zip(batches, again):  # independent of input order
        fields = ("input_ids", "cu_seqlens", "score_mask", "targets", "first_scored", "token_sample_ids")
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in fields)
    by_id = {s.sample_id: s for s in samples}
    seen = []
    for b in batches:
        assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.n_tokens
        assert b.n_tokens <= budget or len(b.cu_seqlens) == 2, "only a lone over-long sample may exceed the budget"
        assert b.max_seqlen == int((b.cu_seqlens[1:] - b.cu_seqlens[:-1]).max())
        sample_ids = b.token_sample_ids[b.cu_seqlens[:-1].long()].tolist()  # each sequence's first token
        for j, sid in enumerate(sample_ids):
            s, (lo, hi) = by_id[sid], b.cu_seqlens[j:j + 2].tolist()
            assert torch.equal(b.input_ids[lo:hi], s.input_ids)  # sequence j is exactly that sample, whole
            assert int(b.score_mask[lo:hi].sum()) == s.n_scored and (b.token_sample_ids[lo:hi] == sid).all()
            assert b.targets[lo:hi][b.score_mask[lo:hi]].tolist() == s.input_ids[s.first_scored + 1:].tolist()
            seen.append(sid)
    assert seen == sorted(by_id)
    with pytest.raises(ValueError, match="duplicate sample_id 1"):
        pack_batches(samples + samples[:1], budget)
    with pytest.raises(ValueError, match="no scored position"):
        pack_batches([Sample(0, torch.tensor([1, 2]), 2)], budget)


# ---- real data -------------------------------------------------------------------------------------------------
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def test_real_response_files(shared_data, tmp_path):
    files = sorted((shared_data / "responses").glob("*.jsonl"))
    if not files:
        pytest.skip(f"no response files in {shared_data / 'responses'}")
    from tokenizers import Regex, pre_tokenizers
    split = pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated")
    pieces = lambda s: [p for p, _ in split.pre_tokenize_str(s)]  # noqa: E731
    merged, total = [], 0
    for f in files:
        records, problems = read_records(f)
        assert problems == [] and {r.fmt for r in records} == {"input_output"}, (f, problems[:3])
        for r in records:
            total += 1
            a, b = r.prompt[-200:], r.response[:200]
            if pieces(a + b) != pieces(a) + pieces(b):  # Qwen's BPE would merge across the boundary
                merged.append((r.where, r.response[:10]))
    # the documented condition: a merge happens only where the output starts with whitespace
    assert all(resp[:1].isspace() for _, resp in merged), merged
    print(f"{total} records, boundary merges: {merged}")
    # a real line among broken ones: still read, the others reported by line
    real = (files[0].read_text(encoding="utf-8").splitlines())[0]
    f = write_jsonl(tmp_path / "mixed.jsonl", [real, "{not json", json.dumps({"input": "x", "output": ""})])
    samples, problems = load_samples(f, TOK)
    assert len(samples) == 1 and samples[0].n_scored == len(json.loads(real)["output"].encode("utf-8"))
    assert [p.split(": ")[0] for p in problems] == [f"{f}:2", f"{f}:3"]


def test_messages_with_the_engine_tokenizer(tmp_path):
    from driftscope.testing import write_tokenizer
    from driftscope.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(write_tokenizer(tmp_path / "tok", ["hello world, how are you? fine thanks"] * 20))
    msgs = [{"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine thanks"}]
    f = write_jsonl(tmp_path / "m.jsonl", [json.dumps({"messages": msgs})])
    (s,), problems = load_samples(f, tok, chat_template_kwargs={"enable_thinking": False})
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert problems == [] and "how are you?" in prompt and "fine thanks" not in prompt, prompt
    assert s.input_ids.tolist() == tok.encode(prompt) + tok.encode("fine thanks")
    assert s.n_prompt == len(tok.encode(prompt))


def test_next_fit_groups_in_order_within_budget():
    from driftscope.engine.data import next_fit

    lengths = [3, 0, 5, 9, 1, 1, 4, 20, 2]
    groups = next_fit(lengths, 8)
    assert [i for g in groups for i in g] == [i for i, n in enumerate(lengths) if n]  # order kept, zeros out
    for g in groups:
        assert sum(lengths[i] for i in g) <= 8 or len(g) == 1, g  # only a lone oversize item exceeds
    for a, b in zip(groups, groups[1:]):  # next-fit: the next group's first item did not fit
        assert sum(lengths[i] for i in a) + lengths[b[0]] > 8


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECORDS[:2]).encode())
    records, problems = read_records(p)
    assert problems == [] and [r.fmt for r in records] == ["input_output", "prompt_response"]


def test_token_id_fields_are_scored_as_given(tmp_path):
    p = tmp_path / "ids.jsonl"
    rows = [{"input": "Q", "output": "ab", "output_token_ids": [97, 98, 0]},  # an EOS-like 0 after the text
            {"input": "Q", "output": "", "input_token_ids": [5, 6], "output_token_ids": [7]},
            {"input": "Q", "output": "zz", "output_token_ids": [97]},  # does not decode to the output
            {"input": "Q", "output": "x", "output_token_ids": [1, -2]}]

    class Decoding(ByteTokenizer):
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, problems = load_samples(p, Decoding())
    assert [s.input_ids.tolist() for s in samples] == [[ord("Q"), 97, 98, 0], [5, 6, 7]]
    assert [s.n_prompt for s in samples] == [1, 2]
    assert any(":3: output_token_ids do not decode" in x for x in problems)
    assert any(":4: field 'output_token_ids' must be a list of token ids" in x for x in problems)
