"""`driftscope generate` (records, resume, refusals) and drift while generating: `drift --generate` gives the numbers
of `generate` followed by `drift` on its output, for several tuned models and datasets, and resumes exactly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from driftscope import drift
from driftscope.drift_run import gen_drift
from driftscope.responses import GenerateOptions, generate_responses
from driftscope.cli import main
from driftscope.engine.decoding import GenerationEngine
from driftscope.engine.sampling import SamplingParams

NEW = 10


def _prompts(path: Path, n: int = 7) -> Path:
    rows = [{"prompt": f"Question {i}: what is {i} plus {2 * i}?"} for i in range(n)]
    rows.insert(2, {"messages": [{"role": "user", "content": "Say something about rivers."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _numbers(obj, prefix=""):
    """Flatten a summary into {path: number or string}; skips what differs by construction (paths, problems)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("problems", "generation", "checkpoint"):
                out.update(_numbers(v, f"{prefix}.{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def _assert_same_task(a: dict, b: dict, what: str) -> None:
    """Equal counts and ranks; floats to float32 rounding of O(1) hidden states (PCA projections near zero vary by
    ~2e-6 absolute between a decode step and a teacher-forced forward)."""
    fa, fb = _numbers(a), _numbers(b)
    assert fa.keys() == fb.keys(), f"{what}: fields differ: {sorted(fa.keys() ^ fb.keys())[:5]}"
    bad = []
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, float) or isinstance(y, float):
            if x is None or y is None or not math.isclose(x, y, rel_tol=2e-5, abs_tol=1e-5):
                bad.append((k, x, y))
        elif x != y:
            bad.append((k, x, y))
    assert not bad, f"{what}: {len(bad)} of {len(fa)} values differ, first {bad[:5]}"


def test_drift_generate_equals_generate_then_drift(models, records, tmp_path):
    data = [records, _prompts(tmp_path / "asks.jsonl")]
    tuned = [models["tuned"], models["late"]]
    gen = drift(models["base"], tuned, data, tmp_path / "gen", generate=True, max_new_tokens=NEW, generate_chunk=3,
                progress=False, checkpoint_every=0)
    for t in tuned:
        files = []
        for d in data:
            out = tmp_path / f"{t.name}-{d.stem}.jsonl"
            generate_responses(t, d, out, SamplingParams(max_new_tokens=NEW), GenerateOptions(progress=False))
            files.append(out)
            mine = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
            theirs = gen.responses[t.name][d.stem]
            assert [r["output_token_ids"] for r in mine] == [r["output_token_ids"] for r in theirs]
            assert [r["input"] for r in mine] == [r["input"] for r in theirs]
            assert (tmp_path / "gen" / "responses" / t.name / f"{d.stem}.jsonl").is_file()
        teacher = drift(models["base"], [t], files, None, progress=False)
        for d, f in zip(data, files):
            a = gen.summary["models"][t.name]["tasks"][d.stem]
            b = teacher.summary["models"][t.name]["tasks"][f.stem]
            assert a["tokens"] == sum(len(r["output_token_ids"]) for r in gen.responses[t.name][d.stem]) > 0
            _assert_same_task(a, b, f"{t.name}/{d.stem}")
    g = gen.summary["models"]["tuned"]["tasks"]["asks"]["generation"]
    assert g["responses"] == 8 and sum(g["finish_reasons"].values()) == 8


def test_drift_generate_resumes_after_an_interrupt(models, records, tmp_path, monkeypatch):
    kw = dict(generate=True, max_new_tokens=6, generate_chunk=4, progress=False, checkpoint_every=0)
    whole = drift(models["base"], [models["tuned"]], [records], tmp_path / "whole", **kw)
    real, calls = gen_drift.generate_chunk, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(gen_drift, "generate_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        drift(models["base"], [models["tuned"]], [records], tmp_path / "cut", **kw)
    monkeypatch.setattr(gen_drift, "generate_chunk", real)
    resumed = drift(models["base"], [models["tuned"]], [records], tmp_path / "cut", resume=True, **kw)
    a, b = whole.summary["models"]["tuned"]["tasks"], resumed.summary["models"]["tuned"]["tasks"]
    _assert_same_task(a, b, "resumed")
    assert a["mixed"]["generation"] == b["mixed"]["generation"]
    assert whole.responses == resumed.responses


def _cli_generate(model, data, out, *extra) -> int:
    return main(["generate", "--model", str(model), "--data", str(data), "--out", str(out), "--max-new-tokens", "8",
                 "--no-progress", *extra])


def test_generate_cli_continues_an_interrupted_run(models, tmp_path, monkeypatch, capsys):
    data = _prompts(tmp_path / "p.jsonl")
    sampling = ["--temperature", "0.8", "--top-p", "0.9", "-n", "2", "--seed", "3"]
    assert _cli_generate(models["tuned"], data, tmp_path / "whole.jsonl", *sampling) == 0
    real, yielded = GenerationEngine.run, []

    def run_then_stop(self, requests, **kw):
        for g in real(self, requests, **kw):
            if len(yielded) == 5:
                raise KeyboardInterrupt
            yielded.append(g)
            yield g

    monkeypatch.setattr(GenerationEngine, "run", run_then_stop)
    out = tmp_path / "cut.jsonl"
    assert _cli_generate(models["tuned"], data, out, *sampling) == 130
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 5
    monkeypatch.setattr(GenerationEngine, "run", real)
    capsys.readouterr()
    # another temperature must not mix with the interrupted run: refused, naming the option
    assert _cli_generate(models["tuned"], data, out, "--temperature", "0.5", "--top-p", "0.9", "-n", "2",
                         "--seed", "3") == 2
    assert "sampling" in capsys.readouterr().err
    assert _cli_generate(models["tuned"], data, out, *sampling) == 0
    assert "5 from the interrupted run" in capsys.readouterr().out
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
    assert not partial.exists()
    assert _cli_generate(models["tuned"], data, out, *sampling) == 2  # a finished OUT is not overwritten silently
    assert "--overwrite" in capsys.readouterr().err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(8) for s in range(2)]
    assert all(set(r) >= {"input", "output", "output_token_ids", "finish_reason"} for r in rows)


@pytest.mark.parametrize("args,message", [
    (["--top-p", "0"], "top_p=0.0 is invalid"),
    (["--temperature", "-1"], "temperature=-1.0 is invalid"),
    (["--max-new-tokens", "0"], "max_new_tokens=0 is invalid"),
    (["--limit", "0"], "limit=0 is invalid"),
], ids=["top_p", "temperature", "max_new_tokens", "limit"])
def test_generate_cli_refuses_bad_options_in_one_line(models, tmp_path, capsys, args, message):
    data = _prompts(tmp_path / "p.jsonl")
    assert _cli_generate(models["tuned"], data, tmp_path / "o.jsonl", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_generate_cli_refuses_bad_inputs_in_one_line(models, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 600}) + "\n")  # max_position_embeddings is 512
    for data, message in ((empty, "no usable prompt record"), (tmp_path, "is a directory"),
                          (tmp_path / "missing.jsonl", "does not exist"), (long, "exceeds the context of 512 tokens")):
        assert _cli_generate(models["tuned"], data, tmp_path / "o.jsonl") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert _cli_generate(models["tuned"], empty, tmp_path / "o.jsonl", "--chat-template-kwargs", "{bad") == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_drift_skips_records_whose_ids_do_not_match_their_text(models, tmp_path):
    data = _prompts(tmp_path / "p.jsonl", n=3)
    out = tmp_path / "r.jsonl"
    generate_responses(models["tuned"], data, out, SamplingParams(max_new_tokens=6), GenerateOptions(progress=False))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    rows[1]["output"] = "an edited answer"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = drift(models["base"], [models["tuned"]], [out], None, progress=False)
    t = rep.summary["models"]["tuned"]["tasks"]["r"]
    assert t["samples"] == len(rows) - 1
    assert any(":2: output_token_ids do not decode" in p for p in t["problems"])


def test_the_commands_agree_drift_generate_vs_generate_then_drift(models, tmp_path):
    """The acceptance check as a user types it: `driftscope drift --generate` vs `driftscope generate` then
    `driftscope drift` on its output, compared through summary.json."""
    data = _prompts(tmp_path / "asks.jsonl", n=4)
    resp = tmp_path / "resp.jsonl"
    common = ["--max-new-tokens", "7", "--no-progress"]
    assert main(["generate", "--model", str(models["tuned"]), "--data", str(data), "--out", str(resp), *common]) == 0
    assert main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(resp),
                 "--out", str(tmp_path / "two"), "--no-progress"]) == 0
    assert main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(data),
                 "--out", str(tmp_path / "one"), "--generate", *common]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())["models"]["tuned"]["tasks"]["asks"]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["models"]["tuned"]["tasks"]["resp"]
    _assert_same_task(one, two, "CLI")
    assert [json.loads(x)["output_token_ids"] for x in resp.read_text().splitlines()] == \
        [json.loads(x)["output_token_ids"]
         for x in (tmp_path / "one" / "responses" / "tuned" / "asks.jsonl").read_text().splitlines()]


def test_generate_cli_limit_takes_the_first_usable_records(models, tmp_path):
    data = _prompts(tmp_path / "p.jsonl")
    with open(data, "a") as f:
        f.write("{broken\n")
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[-1], *lines[:-1]]) + "\n")  # the bad line first: it is skipped, not counted
    out = tmp_path / "o.jsonl"
    assert _cli_generate(models["tuned"], data, out, "--limit", "3") == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [1, 2, 3]
