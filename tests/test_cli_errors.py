"""The CLI's one error boundary: every user error is one line `driftscope CMD: error: ...` naming what to fix (exit 2),
a bug keeps its traceback (exit 1), --debug shows user errors' tracebacks. Tiny checkpoints (hidden 32, 1 layer)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest

from driftscope.drift_run.options import DriftOptions
from driftscope.drift_run.plan import plan
from driftscope.responses import GenerateOptions
from driftscope.cli import main, one_line
from driftscope.testing import random_checkpoint, write_tokenizer
from driftscope.engine.tokenizer import load_tokenizer
from driftscope.errors import InputError

TEXTS = ["the cat sat on the mat", "a b c d e f g", "hello world this is some text"] * 3
SHORT_CONTEXT = 12


def _checkpoint(root: Path, corpus: list[str], seed: int) -> Path:
    write_tokenizer(root, corpus, vocab_size=300)
    random_checkpoint(root, seed=seed, vocab_size=load_tokenizer(root).vocab_size, hidden_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, intermediate_size=64)
    return root


def _variant(src: Path, dst: Path, config: dict | None = None, template: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if template is not None:
        tcfg = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps({**tcfg, "chat_template": template}))
    return dst


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-errors")
    base = _checkpoint(root / "base", TEXTS, seed=0)
    out = {"root": root, "base": base, "tuned": _checkpoint(root / "tuned", TEXTS, seed=1),
           "other": _checkpoint(root / "other", ["zebra quartz yonder " * 3, "jumps vexed wizards"], seed=2),
           "short": _variant(base, root / "short", config={"max_position_embeddings": SHORT_CONTEXT}),
           "broken": _variant(base, root / "broken", template="{% if x %}\n{{ messages[0]['content'] }\n{% endif %}"),
           "sandbox": _variant(base, root / "sandbox", template="line one\n{{ ''.__class__.__mro__ }}")}
    rows = [{"prompt": "the cat", "response": " sat on the mat"}] * 4
    out["data"] = _write(root / "data.jsonl", rows)
    out["msgs"] = _write(root / "msgs.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "the cat"}]}])
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _drift(ck, *extra, base=None, tuned=None, data=None, out=None) -> int:
    return main(["drift", "--base", str(base or ck["base"]), "--tuned", str(tuned or ck["tuned"]), "--data",
                 str(data or ck["data"]), "--out", str(out or ck["root"] / "out"), "--no-progress", *extra])


def _generate(ck, *extra, model=None, data=None, out=None) -> int:
    return main(["generate", "--model", str(model or ck["base"]), "--data", str(data or ck["data"]), "--out",
                 str(out or ck["root"] / "responses.jsonl"), "--no-progress", "--max-new-tokens", "4", *extra])


def _error(capsys, cmd: str, *named: str) -> str:
    """The one stderr line of a user error, which must name each of `named`."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"driftscope {cmd}: error: ") and "Traceback" not in err, err
    assert all(n in lines[0] for n in named), (named, lines[0])
    return lines[0]


# ---- paths ----------------------------------------------------------------------------------------------------------
def test_missing_or_directory_data(ck, capsys):
    assert _drift(ck, data=ck["root"] / "nope.jsonl") == 2
    _error(capsys, "drift", str(ck["root"] / "nope.jsonl"), "does not exist")
    assert _drift(ck, data=ck["root"]) == 2
    _error(capsys, "drift", f"--data {ck['root']} is a directory")
    assert _generate(ck, data=ck["root"]) == 2
    _error(capsys, "generate", f"prompts file {ck['root']} is a directory")


@pytest.mark.parametrize("flag", ["--base", "--tuned"])
def test_a_checkpoint_flag_naming_a_file(ck, capsys, flag):
    config = ck["base"] / "config.json"
    assert _drift(ck, **{flag[2:]: config}) == 2
    _error(capsys, "drift", f"{flag} {config} is a file but not a GGUF file")


def test_eval_and_generate_model_naming_a_file(ck, capsys):
    config = ck["base"] / "config.json"
    assert main(["eval", "--model", str(config), "--tasks", "ifeval", "--out", str(ck["root"] / "e")]) == 2
    _error(capsys, "eval", f"--model {config} is a file")
    assert _generate(ck, model=config) == 2
    _error(capsys, "generate", f"--model {config} is a file")


def test_out_that_is_or_lies_below_a_file(ck, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        assert _drift(ck, out=out) == 2
        _error(capsys, "drift", str(out))
        with pytest.raises(InputError, match=f"--out {out} (is a file|lies below the file {blocker})"):
            plan(ck["base"], ck["tuned"], ck["data"], DriftOptions(), out=out)
    assert _generate(ck, out=blocker / "r.jsonl") == 2
    _error(capsys, "generate", f"--out {blocker / 'r.jsonl'} lies below the file {blocker}")


# ---- options --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, why", [("{bad", "is not valid JSON"), ("[1,2]", "must be a JSON object")])
def test_chat_template_kwargs_must_be_a_json_object(ck, capsys, value, why):
    assert _drift(ck, "--chat-template-kwargs", value) == 2
    _error(capsys, "drift", "--chat-template-kwargs", why)
    assert _generate(ck, "--chat-template-kwargs", value) == 2
    _error(capsys, "generate", "--chat-template-kwargs", why)
    for cls in (DriftOptions, GenerateOptions):
        with pytest.raises(InputError, match=f"chat_template_kwargs=.* {why}"):
            cls(chat_template_kwargs=json.loads(value) if why.startswith("must") else value)
    assert DriftOptions(chat_template_kwargs='{"a": 1}').chat_template_kwargs == {"a": 1}


def test_bad_option_values_name_the_option(ck, capsys):
    assert _drift(ck, "--checkpoint-every", "-1") == 2
    _error(capsys, "drift", "checkpoint_every=-1.0")
    assert _drift(ck, "--pca", "paper", "--pca-queries", "50") == 2
    _error(capsys, "drift", "pca_queries=50", "has only 4 query texts", "--pca-queries 4")
    assert _drift(ck, "--max-batch-tokens", "0") == 2
    _error(capsys, "drift", "max_batch_tokens=0 is invalid: expected an integer >= 1 (--max-batch-tokens)")
    assert _drift(ck, "--max-batch-tokens", "many") == 2  # a usage error is one line too
    _error(capsys, "drift", "--max-batch-tokens", "'many'")


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def test_mismatched_vocabularies(ck, capsys):
    assert _drift(ck, tuned=ck["other"]) == 2
    _error(capsys, "drift", f"the tokenizers of {ck['base']} and {ck['other']} differ")


def test_a_truncated_tokenizer_json_is_named(ck, tmp_path, capsys):
    bad = _variant(ck["base"], tmp_path / "trunc")
    text = (bad / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(bad)
    assert _drift(ck, base=bad, tuned=bad) == 2
    _error(capsys, "drift", f"{bad / 'tokenizer.json'}: not a valid tokenizer.json")


@pytest.mark.parametrize("kind, why", [("broken", "the chat template does not compile: line 2: unexpected '}'"),
                                       ("sandbox", "chat template line 2: the sandbox blocks it")])
def test_a_bad_chat_template_names_its_file_and_line(ck, capsys, kind, why):
    assert _drift(ck, base=ck[kind], tuned=ck[kind], data=ck["msgs"]) == 2
    _error(capsys, "drift", f"{ck[kind] / 'tokenizer_config.json'}: {why}")
    assert _generate(ck, model=ck[kind], data=ck["msgs"]) == 2
    _error(capsys, "generate", f"{ck[kind] / 'tokenizer_config.json'}: {why}")


def test_a_broken_chat_template_jinja_file_is_named(ck, tmp_path, capsys):
    d = _variant(ck["base"], tmp_path / "jinja")
    (d / "chat_template.jinja").write_text("ok\nok\n{% for %}")
    assert _generate(ck, model=d, data=ck["msgs"]) == 2
    _error(capsys, "generate", f"{d / 'chat_template.jinja'}: the chat template does not compile: line 3")


# ---- records --------------------------------------------------------------------------------------------------------
def _long_records(path: Path) -> Path:
    """One record that fits SHORT_CONTEXT, then five that do not: three with a long response (lines 2-4), two with a
    prompt longer than the context (lines 5-6)."""
    return _write(path, [{"prompt": "the cat", "response": " sat"}]
                  + [{"prompt": "the cat", "response": " sat on the mat" * 4}] * 3
                  + [{"prompt": "the cat sat on the mat " * 3, "response": " hello world"}] * 2)


def test_records_longer_than_the_context_are_refused_by_name(ck, tmp_path, capsys):
    data = _long_records(tmp_path / "long.jsonl")
    context = f"the context of {SHORT_CONTEXT} tokens (max_position_embeddings of {ck['short'] / 'config.json'})"
    assert _drift(ck, base=ck["short"], tuned=ck["short"], data=data) == 2
    _error(capsys, "drift", f"5 records longer than {context}: {data}:2 (", f"{data}:4 (", "and 2 more",
           "--overlong truncate")
    assert _drift(ck, "--generate", "--max-new-tokens", "4", base=ck["short"], tuned=ck["short"], data=data) == 2
    _error(capsys, "drift", f"2 records whose prompt + max_new_tokens 4 exceeds {context}: {data}:5 (")
    assert _generate(ck, model=ck["short"], data=data) == 2
    _error(capsys, "generate", f"2 records whose prompt + max_new_tokens 4 exceeds {context}: {data}:5 (",
           f"{data}:6 (")


def test_overlong_truncate_scores_the_first_tokens_and_says_so_once(ck, tmp_path, caplog):
    data = _long_records(tmp_path / "long.jsonl")
    p = plan(ck["short"], ck["short"], data, DriftOptions(overlong="truncate"))
    samples = [s for g in p.tasks[0].groups for s in g]
    assert [s.where for s in samples if s.truncated] == [f"{data}:{i}" for i in (2, 3, 4)]
    assert len(samples) == 4 and max(len(s.input_ids) for s in samples) == SHORT_CONTEXT
    assert [x.split(": ")[0] for x in p.tasks[0].problems] == [f"{data}:5", f"{data}:6"]  # no response token left
    said = [r.getMessage() for r in caplog.records if "--overlong truncate" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("5 record(s) longer than the context of 12 tokens"), said
    gen = plan(ck["short"], ck["short"], data, DriftOptions(generate=True, max_new_tokens=4, overlong="truncate"))
    assert [it.where for it in gen.tasks[0].prompts] == [f"{data}:{i}" for i in range(1, 5)]
    assert gen.tasks[0].problems[0].startswith(f"{data}:5: the prompt fills the context of 12 tokens")


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_byte_order_mark_keeps_the_first_record(ck, tmp_path, suffix):
    rows = [{"prompt": "the cat", "response": " sat"}, {"prompt": "a b", "response": " c d"}]
    body = json.dumps(rows) if suffix == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    data = tmp_path / f"bom.{suffix}"
    data.write_bytes(b"\xef\xbb\xbf" + body.encode())
    task = plan(ck["base"], ck["tuned"], data, DriftOptions()).tasks[0]
    assert task.problems == [] and sum(len(g) for g in task.groups) == 2


# ---- the boundary ---------------------------------------------------------------------------------------------------
def _fake_drift(monkeypatch, result=None, exc: BaseException | None = None):
    def drift(*args, **options):
        if exc is not None:
            raise exc
        return result

    monkeypatch.setattr("driftscope.drift_run.run.drift", drift)


def test_the_summary_prints_n_a_for_missing_numbers(ck, monkeypatch, capsys):
    task = {"tokens": 3, "samples": 1, "kl_tb": {"token_mean": None}, "sampled_kl": float("nan"),
            "rank_shift": {"token_mean": 0.25}, "top1_agreement": None}
    _fake_drift(monkeypatch, SimpleNamespace(summary={"models": {"m": {"tasks": {"t": task}}}}, files={}))
    assert _drift(ck) == 0
    assert ("m / t: 3 tokens, 1 samples, KL(tuned||base) n/a, sampled KL n/a, rank shift 0.250, top-1 agreement n/a"
            in capsys.readouterr().out)


@pytest.mark.parametrize("exc, named", [
    (OSError(28, "No space left on device", "/data/out/summary.json"), "/data/out/summary.json: No space left"),
    (PermissionError(13, "Permission denied"), "Permission denied"),
    (json.JSONDecodeError("Expecting value", "x", 0), "Expecting value: line 1 column 1"),
    (jinja2.TemplateError("a template\nof two lines"), "a template; of two lines"),
    (ModuleNotFoundError("No module named 'lm_eval'"), "No module named 'lm_eval' (an optional dependency"),
], ids=["oserror-path", "oserror-no-path", "json", "jinja", "missing-module"])
def test_user_error_types_are_one_line(ck, monkeypatch, capsys, exc, named):
    _fake_drift(monkeypatch, exc=exc)
    assert _drift(ck) == 2
    _error(capsys, "drift", named)


def test_an_oserror_message_without_its_path_gets_it():
    exc = FileExistsError("exists")
    exc.filename = "/x/y"
    assert one_line(exc) == "/x/y: exists"


def test_an_internal_bug_keeps_its_traceback_and_asks_for_a_report(ck, monkeypatch, capsys):
    _fake_drift(monkeypatch, exc=ZeroDivisionError("division by zero"))
    assert _drift(ck) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ZeroDivisionError" in err.splitlines()[-2], err
    assert err.splitlines()[-1] == ("driftscope drift: internal error: ZeroDivisionError: division by zero (a bug: "
                                    "please report it with the traceback above)")


def test_debug_shows_the_traceback_of_a_user_error(ck, capsys):
    missing = ck["root"] / "nope.jsonl"
    assert main(["--debug", "ti", "--base", str(missing), "--tuned", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("driftscope ti: error: "), err
    assert main(["ti", "--base", str(missing), "--tuned", str(missing)]) == 2
    _error(capsys, "ti", str(missing))


def test_an_interrupted_eval_says_how_to_continue(ck, monkeypatch, capsys):
    def evaluate(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("driftscope.eval.run.evaluate", evaluate)
    out = ck["root"] / "e"
    assert main(["eval", "--model", str(ck["base"]), "--tasks", "ifeval", "--out", str(out)]) == 130
    assert capsys.readouterr().err == f"interrupted; rerun the same command to continue (state in {out})\n"


def test_python_m_driftscope(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "driftscope", "--help"], capture_output=True, text=True,
                              timeout=120)
    assert help_run.returncode == 0 and "--debug" in help_run.stdout and "drift" in help_run.stdout
    bad = subprocess.run([sys.executable, "-m", "driftscope", "ti", "--base", str(tmp_path / "b.json"), "--tuned",
                          str(tmp_path / "t.json")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and str(tmp_path / "b.json") in bad.stderr, bad.stderr


def test_commands_that_do_not_scale_out_refuse_torchrun(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["backends"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("driftscope backends: error:") and "WORLD_SIZE=2" in err and "\n" not in err
    # grading a file is one process's work: refused before it reads anything
    assert main(["eval", "--responses", str(tmp_path / "r.jsonl"), "--benchmark", "math500", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval --responses" in err and "WORLD_SIZE=2" in err and "\n" not in err and not (tmp_path / "o").exists()


def test_a_collective_broken_by_another_process_is_one_line_not_a_bug(monkeypatch, capsys, tmp_path):
    """Under torchrun, when one process stops (Ctrl-C, an error), the others' collectives fail: each says so in one
    line with how to continue (exit 2), not as an internal error; an unrelated RuntimeError stays a bug (exit 1)."""
    from driftscope import responses

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = ["generate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out",
            str(tmp_path / "r.jsonl")]

    def broken(*a, **k):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:29500")

    monkeypatch.setattr(responses, "generate_responses", broken)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "process 0 of 2: another process stopped" in err and "closed by peer" in err
    assert "rerun the same torchrun command (2 processes) to continue" in err and "Traceback" not in err

    def bug(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(responses, "generate_responses", bug)
    assert main(args) == 1
    assert "internal error: RuntimeError: shape mismatch" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no other process to blame
    monkeypatch.setattr(responses, "generate_responses", broken)
    assert main(args) == 1


def cli_pair(root: Path) -> dict:
    """A base/tuned checkpoint pair sharing a tokenizer and a 4-record data file under `root` (for the CLI tests)."""
    return {"root": root, "base": _checkpoint(root / "base", TEXTS, seed=0),
            "tuned": _checkpoint(root / "tuned", TEXTS, seed=1),
            "data": _write(root / "data.jsonl", [{"prompt": "the cat", "response": " sat on the mat"}] * 4)}
