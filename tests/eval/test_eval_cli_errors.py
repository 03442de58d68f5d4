"""Bad input to `driftscope eval`, `ti` and `lm-eval` (issue [10] §3): one line naming the flag, file:line or value,
exit 2, before any model loads; the noise lm-eval and math-verify used to print; `--tasks all` on a data folder that
holds only some benchmarks."""
from __future__ import annotations

import errno
import json
import logging

import pytest

pytest.importorskip("lm_eval")
from driftscope.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def _model_folder(tmp_path):
    """`--model tmp_path` names a checkpoint folder (its config.json is enough for the up-front check): these tests
    are about what is refused after it."""
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")


def _error(rc: int, err: str, *named: str) -> str:
    """The one error line, after checking exit 2, one line, no traceback, and that it names every one of `named`."""
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)
    return err


@pytest.fixture()
def no_model(monkeypatch):
    """Any model load fails the test: the error must come first."""
    from driftscope.engine import generate

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(generate, "load_for_generation", refuse)


@pytest.mark.parametrize("flag,value", [("--limit", "-1"), ("--limit", "0"), ("--max-gen-toks", "0"),
                                        ("--max-batch-tokens", "-5"), ("--seed", "-1"), ("--seed", str(2**32)),
                                        ("--dist-timeout", "0"), ("--dist-timeout", "nan"), ("--limit", "2.5")])
def test_numeric_flags_out_of_range(tmp_path, capsys, no_model, flag, value):
    rc = main(["eval", "--model", str(tmp_path), "--tasks", "math500", flag, value, "--out", str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, f"argument {flag}: '{value}' is invalid: expected")
    assert not (tmp_path / "o").exists()


def test_lm_eval_pretrained_folder_that_does_not_exist(tmp_path, capsys, monkeypatch):
    rc = main(["lm-eval", "run", "--model", "driftscope", "--model_args", f"pretrained={tmp_path / 'nope'}",
               "--tasks", "ds_math500"])
    err = _error(rc, capsys.readouterr().err, f"pretrained={tmp_path / 'nope'}: no such file or folder")
    assert err.startswith("driftscope lm-eval: error:")


def test_model_folder_that_does_not_exist(tmp_path, capsys):
    rc = main(["eval", "--model", str(tmp_path / "nope"), "--tasks", "math500", "--out", str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, f"--model {tmp_path / 'nope'}: no such file or folder")


def test_responses_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    rc = main(["eval", "--benchmark", "math500", "--responses", str(tmp_path / "adir"), "--out", str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, f"{tmp_path / 'adir'} is a directory, expected a JSONL file")


def test_out_that_is_a_file_is_named_before_any_work(tmp_path, capsys, no_model):
    (tmp_path / "f").write_text("x")
    for args in (["--benchmark", "math500", "--responses", str(tmp_path / "missing.jsonl")],  # not read at all
                 ["--model", str(tmp_path), "--tasks", "math500"]):
        rc = main(["eval", *args, "--out", str(tmp_path / "f")])
        _error(rc, capsys.readouterr().err, f"--out {tmp_path / 'f'} is a file; expected a folder")
    rc = main(["eval", "--model", str(tmp_path), "--tasks", "math500", "--out", str(tmp_path / "f" / "sub")])
    _error(rc, capsys.readouterr().err, f"--out {tmp_path / 'f' / 'sub'} cannot be made: {tmp_path / 'f'} is a file")


def test_ti_out_that_is_a_file(tmp_path, capsys):
    for side, score in (("base", 50.0), ("tuned", 60.0)):
        (tmp_path / f"{side}.json").write_text(json.dumps({"math500": score, "gpqa_diamond": score}))
    (tmp_path / "f").write_text("x")
    rc = main(["ti", "--base", str(tmp_path / "base.json"), "--tuned", str(tmp_path / "tuned.json"),
               "--out", str(tmp_path / "f")])
    err = _error(rc, capsys.readouterr().err, f"--out {tmp_path / 'f'} is a file")
    assert ".tmp" not in err


def test_responses_not_utf8_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"output": "fine"}).encode() + b"\n" + '{"output": "café"}\n'.encode("latin-1"))
    rc = main(["eval", "--benchmark", "math500", "--responses", str(path), "--out", str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, f"{path}:2: responses file is not UTF-8 text", "0xe9")


def test_hugging_face_offline_is_one_line_before_the_model(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as the conftest sets it: datasets may read its cache only
    rc = main(["eval", "--model", str(tmp_path), "--tasks", "mctaco", "--out", str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, "CogComp/mc_taco", "HF_DATASETS_OFFLINE is set", "pass --data-dir")


def test_hugging_face_hub_unreachable_fails_fast(tmp_path, capsys, monkeypatch, no_model):
    """No offline variable and no connection to the hub: one line at once, instead of datasets' ~30 s of retries."""
    import datasets

    from driftscope.eval import benchmarks

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    tried = []

    def unreachable(address, timeout):
        tried.append((address, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    def refuse(*a, **k):
        raise AssertionError("datasets was asked for the dataset")

    monkeypatch.setattr(benchmarks.socket, "create_connection", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    rc = main(["eval", "--model", str(tmp_path), "--tasks", "mctaco", "--out", str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, "hub cannot be reached", "huggingface.co: Network is unreachable",
           "pass --data-dir")
    assert tried == [(("huggingface.co", 443), 2.0)]


def test_grading_math_prints_no_math_verify_timeout(shared_data, tmp_path, capfd, caplog):
    """Line 102 of the paper's RL MATH500 responses runs into math-verify's 5 s comparison limit (scored 0). Under
    pytest a warning goes to caplog (its handler on the root logger), not to stderr as it would in a terminal."""
    caplog.set_level(logging.WARNING)
    lines = (shared_data / "responses" / "UniReason-RL_hendrycks_math_500.jsonl").read_text().splitlines()
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"doc_index": i, "output": json.loads(lines[i])["output"]}) + "\n"
                            for i in (0, 101)))
    rc = main(["eval", "--benchmark", "math500", "--responses", str(path), "--data-dir",
               str(shared_data / "benchmarks"), "--out", str(tmp_path / "o")])
    out, err = capfd.readouterr()
    assert rc == 0 and "math500: " in out
    assert "Timeout during comparison" not in err + caplog.text, err + caplog.text


def test_a_model_run_prints_no_lm_eval_or_git_noise(shared_data, tmp_path, capfd, caplog, monkeypatch):
    """lm-eval's --metadata hint (every ds_* task), its 'gen_kwargs specified through cli' for --max-gen-toks, and
    git's 'fatal: not a git repository' (lm-eval's git_hash) when run outside a repository."""
    from eval_helpers import write_model

    model = write_model(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING)
    rc = main(["eval", "--model", str(model), "--tasks", "math500", "--limit", "1", "--max-gen-toks", "4",
               "--data-dir", str(shared_data / "benchmarks"), "--out", str(tmp_path / "o")])
    err = capfd.readouterr().err + caplog.text
    assert rc == 0, err
    for noise in ("Custom kwargs can be passed", "specified through cli", "fatal: not a git repository"):
        assert noise not in err, err
    assert json.loads((tmp_path / "o" / "lm_eval" / "ds_math500.json").read_text())["git_hash"] is None


@pytest.fixture()
def subset(shared_data, tmp_path):
    """A data folder with some benchmarks: halueval's summarization part gzipped, acpbench a folder."""
    src, d = shared_data / "benchmarks", tmp_path / "data"
    d.mkdir()
    for name in ("math500.jsonl", "headqa_en_test.jsonl", "acpbench", "halueval_qa.jsonl",
                 "halueval_dialogue.jsonl", "halueval_summarization.jsonl.gz"):
        (d / name).symlink_to(src / name)
    return d


def test_tasks_all_runs_the_benchmarks_whose_data_is_there(subset, tmp_path, capsys, monkeypatch):
    from driftscope.eval import run

    asked = []
    monkeypatch.setattr(run, "evaluate", lambda model, names, out, **kw: asked.append(names) or {"scores": {}})
    rc = main(["eval", "--model", str(tmp_path), "--tasks", "all", "--data-dir", str(subset), "--out",
               str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 0 and asked == [["math500", "acpbench", "headqa", "halueval"]]
    assert err.count("\n") == 1 and err.startswith("driftscope eval: note: --tasks all skips aime24 (no file at "
                                                   f"{subset / 'aime24.jsonl'});")
    for name, file in (("coqa", "coqa-dev-v1.0.json"), ("mctaco", "mctaco_test.jsonl")):
        assert f"{name} (no file at {subset / file})" in err


def test_a_named_benchmark_without_data_is_an_error(subset, tmp_path, capsys, no_model):
    rc = main(["eval", "--model", str(tmp_path), "--tasks", "math500,coqa", "--data-dir", str(subset), "--out",
               str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, f"coqa: {subset / 'coqa-dev-v1.0.json'} not found")
    (tmp_path / "empty").mkdir()
    rc = main(["eval", "--model", str(tmp_path), "--tasks", "all", "--data-dir", str(tmp_path / "empty"), "--out",
               str(tmp_path / "o")])
    _error(rc, capsys.readouterr().err, f"--tasks all: no benchmark's data is in --data-dir {tmp_path / 'empty'}")
