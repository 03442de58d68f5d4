"""`driftscope drift` on the command line: outputs, messages, and errors that name the offending input."""
from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from types import SimpleNamespace

import pytest

from driftscope.drift_run.options import DriftOptions
from driftscope.responses import GenerateOptions
from driftscope.cli import build_parser, main
from driftscope.cli_options import options_from

_REQUIRED = {"drift": ["--base", "b", "--tuned", "t", "--data", "d.jsonl", "--out", "o"],
             "generate": ["--model", "m", "--data", "d.jsonl", "--out", "o.jsonl"]}


def test_cli_drift_no_report_writes_the_rest_and_drops_a_stale_report(models, records, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("an earlier run's report")
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(records),
               "--out", str(out), "--no-progress", "--no-report"])
    assert rc == 0 and (out / "summary.json").is_file() and not (out / "report.html").exists()
    assert "report.html" not in capsys.readouterr().out


def test_cli_drift_writes_every_output(models, records, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(records),
               "--out", str(out), "--no-progress", "--max-batch-tokens", "128", "--pca", "paper", "--pca-queries", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("summary.json", "pca_shift.json", "report.html"):
        assert (out / name).is_file() and str(out / name) in printed
    summary = json.loads((out / "summary.json").read_text())
    task = summary["models"]["tuned"]["tasks"]["mixed"]
    assert summary["config"]["max_batch_tokens"] == 128 and task["pca"]["mode"] == "paper"
    entries = json.loads((out / "pca_shift.json").read_text())
    assert entries[0]["benchmark"] == "mixed_PCA_Shift"
    assert {r["state"] for r in entries[0]["data"]} == {"Original", "Updated"}
    assert f"tuned / mixed: {task['tokens']} tokens" in printed
    assert not (out / ".driftscope-state").exists()


def test_cli_drift_reports_bad_lines_and_missing_files(models, tmp_path, capsys):
    data = tmp_path / "some.jsonl"
    data.write_text('{"prompt": "a b c", "response": " d e f g"}\n{"prompt": 3}\nnot json\n')
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--data", str(data),
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    problems = json.loads((tmp_path / "o" / "summary.json").read_text())["models"]["tuned"]["tasks"]["some"]["problems"]
    assert [p.split(": ")[0] for p in problems] == [f"{data}:2", f"{data}:3"], problems
    rc = main(["drift", "--base", str(models["base"]), "--tuned", str(tmp_path / "nope"), "--data", str(data),
               "--out", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and f"--tuned {tmp_path / 'nope'}: no such file or folder" in capsys.readouterr().err


def _subparser(cmd: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[cmd]


def _parse(cmd: str, *flags: str) -> argparse.Namespace:
    return _subparser(cmd).parse_args([*_REQUIRED[cmd], *flags])


@pytest.mark.parametrize("cmd, cls", [("drift", DriftOptions), ("generate", GenerateOptions)])
def test_every_option_field_has_a_flag_with_help_and_the_dataclass_default(cmd, cls):
    by_dest = {a.dest: a for a in _subparser(cmd)._actions}
    parsed = _parse(cmd)
    for f in fields(cls):
        action = by_dest.get(f.name)
        assert action is not None and action.option_strings, f"{cls.__name__}.{f.name} has no {cmd} flag"
        assert action.help and action.help.strip(), f"--{f.name} has no help"
        default = f.default_factory() if f.default is MISSING else f.default
        assert getattr(parsed, f.name) == default and type(getattr(parsed, f.name)) is type(default), f.name
    help_text = _subparser(cmd).format_help()
    assert all(a.option_strings[0] in help_text for a in by_dest.values() if a.option_strings)


def test_every_old_drift_flag_still_parses():
    args = _parse("drift", "--max-batch-tokens", "64", "--max-seq-len", "9", "--device", "cpu", "--dtype", "bfloat16",
                  "--pca", "paper", "--pca-queries", "5", "--pca-texts", "q.txt", "--cka", "none",
                  "--chat-template-kwargs", '{"a": 1}', "--checkpoint-every", "0", "--resume", "--no-progress",
                  "--generate", "--field", "q", "--generate-chunk", "8", "--max-new-tokens", "3", "--temperature",
                  "0.5", "--top-p", "0.9", "--top-k", "4", "--seed", "1", "--stop", "x", "--stop", "y",
                  "--ignore-eos", "--chat", "--system", "s", "--thinking", "off", "--cache-memory", "2GiB",
                  "--max-num-seqs", "7")
    got = options_from(args, DriftOptions)
    want = dict(max_batch_tokens=64, max_seq_len=9, device="cpu", dtype="bfloat16", pca="paper", pca_queries=5,
                pca_texts="q.txt", cka="none", chat_template_kwargs={"a": 1}, checkpoint_every=0.0, resume=True,
                progress=False, generate=True, prompt_field="q", generate_chunk=8, max_new_tokens=3, temperature=0.5,
                top_p=0.9, top_k=4, seed=1, stop=("x", "y"), ignore_eos=True, chat=True, system="s", thinking=False,
                cache_memory=2 * 2**30, max_num_seqs=7)
    assert {k: got[k] for k in want} == want
    assert (args.base, args.tuned, args.data, args.out) == ("b", ["t"], ["d.jsonl"], "o")
    assert _parse("drift", "--thinking", "on").thinking is True and _parse("drift").thinking is None
    with pytest.raises(SystemExit):
        _parse("drift", "--thinking", "maybe")


def test_every_old_generate_flag_still_parses():
    args = _parse("generate", "-n", "2", "--limit", "3", "--field", "f", "--max-new-tokens", "4", "--temperature",
                  "0.7", "--top-p", "0.5", "--top-k", "2", "--seed", "9", "--stop", "z", "--ignore-eos", "--chat",
                  "--system", "s", "--thinking", "on", "--cache-memory", "512MiB", "--max-num-seqs", "3",
                  "--chat-template-kwargs", "{}", "--device", "cpu", "--dtype", "float16", "--restart",
                  "--overwrite", "--no-progress", "--overlong", "truncate")
    assert args.n == 2
    assert options_from(args, DriftOptions, ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                             "ignore_eos"]) == dict(max_new_tokens=4, temperature=0.7, top_p=0.5,
                                                                    top_k=2, seed=9, stop=("z",), ignore_eos=True)
    assert options_from(args, GenerateOptions) == dict(
        limit=3, prompt_field="f", chat=True, system="s", thinking=True, chat_template_kwargs={}, device="cpu",
        dtype="float16", cache_memory=512 * 2**20, block_size=None, max_num_seqs=3, max_step_tokens=8192,
        progress=False, restart=True, overwrite=True, dist_timeout=1800.0, overlong="truncate")


def _fake_drift(monkeypatch, seen: dict, exc: BaseException | None = None):
    def drift(base, tuned, data, out, **options):
        seen.update(options, _opts=DriftOptions(**options), _paths=(base, tuned, data, out))
        if exc is not None:
            raise exc
        return SimpleNamespace(summary={"models": {}}, files={})

    monkeypatch.setattr("driftscope.drift_run.run.drift", drift)


def test_options_once_missing_from_the_cli_reach_drift_options(monkeypatch, capsys):
    seen: dict = {}
    _fake_drift(monkeypatch, seen)
    assert main(["drift", *_REQUIRED["drift"], "--pca-seed", "7", "--top-tokens", "5", "--pca-max-length", "64",
                 "--cka-proj-dim", "32", "--allow-pickle"]) == 0
    o = seen["_opts"]
    assert (o.pca_seed, o.top_tokens, o.pca_max_length, o.cka_proj_dim, o.allow_pickle) == (7, 5, 64, 32, True)
    assert set(seen) - {"_opts", "_paths"} == {f.name for f in fields(DriftOptions)}
    assert seen["_paths"] == ("b", ["t"], ["d.jsonl"], "o")


def test_drift_and_generate_report_errors_and_interrupts_alike(monkeypatch, capsys):
    _fake_drift(monkeypatch, {}, ValueError("bad value"))
    assert main(["drift", *_REQUIRED["drift"]]) == 2
    assert capsys.readouterr().err == "driftscope drift: error: bad value\n"
    _fake_drift(monkeypatch, {}, KeyboardInterrupt())
    assert main(["drift", *_REQUIRED["drift"]]) == 130
    assert capsys.readouterr().err == "interrupted; continue with the same command plus --resume (state in o)\n"

    def generate_responses(model, data, out, params, options):
        raise exc

    monkeypatch.setattr("driftscope.responses.generate_responses", generate_responses)
    exc = FileNotFoundError("no such prompts")
    assert main(["generate", *_REQUIRED["generate"]]) == 2
    assert capsys.readouterr().err == "driftscope generate: error: no such prompts\n"
    exc = KeyboardInterrupt()
    assert main(["generate", *_REQUIRED["generate"]]) == 130
    assert capsys.readouterr().err == ("interrupted; rerun the same command to continue (o.jsonl.partial keeps what "
                                       "was done)\n")
    assert main(["generate", *_REQUIRED["generate"], "--top-p", "2"]) == 2  # SamplingParams refuses it: exit 2
    assert "top_p=2.0 is invalid" in capsys.readouterr().err
