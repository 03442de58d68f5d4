"""Bad input that once escaped the CLI ([10] §3, the drift / generate side): every numeric option checked against its
declared range, a tuned checkpoint without a tokenizer said once and recorded, a file's bad records in one line, the
same --tuned / --data twice refused, no `\\r` frames or git noise in a log, and one thread on a busy CPU."""
from __future__ import annotations

import io
import json
import logging
import os
import platform
import re
import subprocess
import sys
import typing
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from driftscope.telemetry import Progress
from driftscope.drift_run.options import DriftOptions
from driftscope.drift_run.plan import plan
from driftscope.responses import GenerateOptions
from driftscope.cli import main
from driftscope.engine.sampling import SamplingParams
from driftscope.errors import InputError
from test_cli_errors import cli_pair, _drift, _error, _generate, _variant, _write


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> dict:
    return cli_pair(tmp_path_factory.mktemp("cli-inputs"))


# ---- every numeric option has a range, checked before anything else ---------------------------------------------
def _numbers(cls) -> list[str]:
    """The fields of `cls` that hold a number (int or float, or None)."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in fields(cls)
            if {int, float} & {hints[f.name], *typing.get_args(hints[f.name])} and hints[f.name] is not bool]


def _sampling_names() -> list[str]:
    """The SamplingParams fields that are generate's flags (its decoding options)."""
    return [f.name for f in fields(SamplingParams) if "cli" in f.metadata]


_CASES = ([("drift", DriftOptions, n) for n in _numbers(DriftOptions)]
          + [("generate", GenerateOptions, n) for n in _numbers(GenerateOptions)]
          + [("generate", DriftOptions, n) for n in _numbers(DriftOptions) if n in _sampling_names()])


def test_the_numeric_options_are_found():
    assert {"top_tokens", "cka_proj_dim", "top_p", "checkpoint_every"} <= set(_numbers(DriftOptions))
    assert {"limit", "block_size", "max_step_tokens"} <= set(_numbers(GenerateOptions))


@pytest.mark.parametrize("cmd, cls, name", _CASES, ids=[f"{c}-{n}" for c, _, n in _CASES])
def test_every_numeric_option_refuses_a_value_out_of_its_range(tmp_path, capsys, cmd, cls, name):
    f = next(f for f in fields(cls) if f.name == name)
    bounds = f.metadata.get("range")
    assert bounds, f"{cls.__name__}.{name} is a number without a range: declare it in its cli() (ge=, gt=, le=)"
    integer = int in (typing.get_type_hints(cls)[name], *typing.get_args(typing.get_type_hints(cls)[name]))
    value = bounds["ge"] - (1 if integer else 0.5) if "ge" in bounds else bounds["gt"] if "gt" in bounds \
        else bounds["le"] + 1
    value = value if integer else float(value)
    flag = f.metadata["cli"]["flag"] or "--" + name.replace("_", "-")
    missing = tmp_path / "missing"  # the range is checked first: before any path is looked at or model loaded
    argv = {"drift": ["drift", "--base", str(missing), "--tuned", str(missing), "--data", str(missing)],
            "generate": ["generate", "--model", str(missing), "--data", str(missing)]}[cmd]
    assert main([*argv, "--out", str(tmp_path / "out"), flag, str(value)]) == 2
    line = _error(capsys, cmd, flag, str(value))
    assert "missing" not in line and "n_tuned" not in line, line
    with pytest.raises(InputError, match=re.escape(f"{name}={value!r} is invalid: expected ")):
        cls(**{name: value})
    if "ge" in bounds or "le" in bounds:  # the bound itself is in range
        cls(**{name: bounds.get("ge", bounds.get("le"))})


# ---- a tuned checkpoint without a tokenizer ----------------------------------------------------------------------
def test_a_tuned_checkpoint_without_a_tokenizer_is_said_once_and_recorded(ck, tmp_path, caplog):
    bare = _variant(ck["tuned"], tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(["drift", "--base", str(ck["base"]), "--tuned", str(ck["tuned"]), "--tuned", str(bare), "--data",
                     str(ck["data"]), "--out", str(out), "--no-progress"]) == 0
    said = [r.getMessage() for r in caplog.records if "tokenizer" in r.getMessage()]
    assert len(said) == 1 and f"--tuned {bare} has no tokenizer.json" in said[0], said
    models = json.loads((out / "summary.json").read_text())["models"]
    assert models["bare"]["tokenizer"] == f"base's ({bare} has no tokenizer.json)"
    assert models["tuned"]["tokenizer"] == str(ck["tuned"] / "tokenizer.json")


# ---- a file's bad records in one line ----------------------------------------------------------------------------
def test_records_without_the_field_are_one_line_however_many(ck, tmp_path, capsys, caplog):
    rows = [{"prompt": "the cat"}] * 7
    none = _write(tmp_path / "none.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        assert _generate(ck, "--field", "question", data=none) == 2
    _error(capsys, "generate", f"{none}: no usable prompt record (7 records skipped: {none}:1: record has no field "
           f"'question'", f"also {none}:2, {none}:3, {none}:4 and 3 more)")
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # the error alone: no line per record
    some = _write(tmp_path / "some.jsonl", [*rows, {"question": "a b"}])
    with caplog.at_level(logging.WARNING):
        assert _generate(ck, "--field", "question", data=some, out=tmp_path / "r.jsonl") == 0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"7 records skipped: {some}:1: ") and "and 3 more" in said[0], said
    assert capsys.readouterr().err.count("7 records skipped") == 1  # the closing count


# ---- the same input twice ----------------------------------------------------------------------------------------
def test_the_same_tuned_or_data_twice_is_refused(ck, capsys):
    again = ck["tuned"].parent / ".." / ck["tuned"].parent.name / "tuned"  # another spelling of the same folder
    base, tuned, data = (str(ck[k]) for k in ("base", "tuned", "data"))
    assert main(["drift", "--base", base, "--tuned", tuned, "--tuned", str(again), "--data", data, "--out",
                 str(ck["root"] / "o")]) == 2
    _error(capsys, "drift", f"--tuned {again} is given twice (as {tuned})")
    assert main(["drift", "--base", base, "--tuned", tuned, "--data", data, "--data", data, "--out",
                 str(ck["root"] / "o")]) == 2
    _error(capsys, "drift", f"--data {data} is given twice: give each records file once")
    with pytest.raises(InputError, match="given twice"):
        plan(ck["base"], [ck["tuned"], again], ck["data"], DriftOptions())
    assert not (ck["root"] / "o").exists()


# ---- a log file gets plain lines ---------------------------------------------------------------------------------
def test_a_cli_run_writes_no_frames_and_no_git_noise_into_a_log(ck, tmp_path):
    """stderr captured (not a terminal), run from a folder that is no git repository."""
    run = [sys.executable, "-m", "driftscope"]
    drift = subprocess.run([*run, "drift", "--base", str(ck["base"]), "--tuned", str(ck["tuned"]), "--data",
                            str(ck["data"]), "--out", "out"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    gen = subprocess.run([*run, "generate", "--model", str(ck["base"]), "--data", str(ck["data"]), "--out", "r.jsonl",
                          "--max-new-tokens", "3", "--progress"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    for r, label in ((drift, "drift ["), (gen, "generate [")):
        assert r.returncode == 0, r.stderr
        assert "\r" not in r.stderr and "fatal:" not in r.stderr and label in r.stderr, r.stderr


def test_progress_draws_frames_on_a_terminal_and_occasional_lines_in_a_log(monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr("driftscope.telemetry.time.perf_counter", lambda: now["t"])
    for tty in (True, False):
        err = type("Err", (io.StringIO,), {"isatty": lambda self, tty=tty: tty})()
        monkeypatch.setattr(sys, "stderr", err)
        bar = Progress(100, "drift")
        for _ in range(10):  # a unit per second, then the last after the interval
            now["t"] += 1.0
            bar.advance(1)
        now["t"] += Progress.PLAIN_EVERY_S
        bar.advance(1)
        bar.advance(89)
        bar.close()
        text = err.getvalue()
        if tty:
            assert text.count("\r") == 12 and text.count("\n") == 1 and text.endswith("\n"), text
        else:  # the first unit, one after the interval, the last
            assert "\r" not in text and re.findall(r" (\d+)/100 tok", text) == ["1", "11", "100"], text
    assert Progress(1, "x", enabled=None).enabled is False  # default of generate: a terminal only


# ---- one thread on a busy CPU ------------------------------------------------------------------------------------
@pytest.fixture
def busy(monkeypatch):
    """A machine whose load average (8) is above its 2 usable cores, torch on 2 threads, OMP_NUM_THREADS unset."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


_NOTE = "ran on 1 thread, not 2: the machine was busy (load average 8.0 on 2 cores); set OMP_NUM_THREADS=N"


def test_a_busy_cpu_runs_on_one_thread_and_the_summary_says_so(ck, busy, tmp_path, capsys):
    assert _drift(ck, out=tmp_path / "out") == 0
    err = capsys.readouterr().err.splitlines()
    assert [x for x in err if "OMP_NUM_THREADS" in x] == [f"driftscope drift: {_NOTE} to choose"], err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["machine"]["torch_threads"] == 1


@pytest.mark.parametrize("cmd", ["generate", "eval", "demo"])
def test_every_model_command_takes_the_rule(busy, tmp_path, capsys, monkeypatch, cmd):
    def stop(*a, **k):
        raise InputError("stopped here")

    monkeypatch.setattr("driftscope.demo.run.run_demo", stop)
    missing = str(tmp_path / "missing")
    argv = {"generate": ["generate", "--model", missing, "--data", missing, "--out", missing],
            "eval": ["eval", "--model", missing, "--tasks", "ifeval", "--out", str(tmp_path / "e")],
            "demo": ["demo", "--out", missing]}[cmd]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()  # the note comes when a run ends: a refused input stays one line
    assert torch.get_num_threads() == 1
    assert len(err) == 1 and err[0].startswith(f"driftscope {cmd}: error: "), err


@pytest.mark.parametrize("case", ["quiet machine", "OMP_NUM_THREADS set", "on a GPU", "not a model command"])
def test_the_rule_leaves_the_threads_alone_otherwise(ck, busy, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr("driftscope.drift_run.run.drift", lambda *a, **k: SimpleNamespace(summary={"models": {}},
                                                                                          files={}))
    argv = ["drift", "--base", "b", "--tuned", "t", "--data", "d", "--out", "o"]
    if case == "quiet machine":
        monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    elif case == "OMP_NUM_THREADS set":
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
    elif case == "on a GPU":
        argv += ["--tuned-device", "cuda:1"]
    else:
        argv = ["ti", "--base", str(tmp_path / "b.json"), "--tuned", str(tmp_path / "t.json")]
    main(argv)
    assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" not in capsys.readouterr().err


def test_the_tests_pass_their_thread_count_to_subprocesses():
    assert os.environ["OMP_NUM_THREADS"] == str(torch.get_num_threads())  # tests/conftest.py


def test_idle_openmp_threads_sleep_unless_the_user_chose_or_torch_is_loaded():
    from driftscope.cli import passive_openmp

    env: dict = {}
    assert passive_openmp(env, {}) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}, {"KMP_BLOCKTIME": "200"}):
        env = dict(chosen)
        assert not passive_openmp(env, {}) and env == chosen
    env = {}
    assert not passive_openmp(env, {"torch": object()}) and env == {}  # too late: the runtime read it at load


def test_the_command_sets_it_before_torch_loads(tmp_path):
    """In a fresh process, `driftscope` sets the policy before any module imports torch."""
    import subprocess
    import sys

    code = ("import os, sys; from driftscope.cli import main; main(['backends']); "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.splitlines()[-1] == "PASSIVE True"


def test_the_command_keeps_freed_memory_unless_the_user_tuned_malloc():
    from driftscope.cli import MMAP_THRESHOLD, TRIM_THRESHOLD, steady_malloc

    calls: list = []
    assert steady_malloc({}, lambda k, v: calls.append((k, v)) or 1)
    assert calls == [(-3, MMAP_THRESHOLD), (-1, TRIM_THRESHOLD)]  # glibc's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    for chosen in ({"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}):
        calls.clear()
        assert not steady_malloc(chosen, lambda k, v: calls.append((k, v)) or 1) and calls == []
    assert not steady_malloc({}, lambda k, v: 0)  # refused by the C library


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_after_steady_malloc_freed_tensors_stay_in_the_heap():
    """The property it is for, read from glibc's own counters (mallinfo2) in a fresh process: five 20 MiB tensors
    come from the heap, not fresh mmaps (hblkhd), and once freed their 100 MiB stay there for the next ones (fordblks);
    glibc's defaults trim more than 64 MiB of free heap top at once, whatever the history."""
    import subprocess
    import sys

    code = ("import ctypes, torch; from driftscope.cli import steady_malloc\n"
            "class M(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks '\n"
            "    'hblkhd usmblks fsmblks uordblks fordblks keepcost').split()]\n"
            "info = ctypes.CDLL(None).mallinfo2; info.restype = M\n"
            "assert steady_malloc({})\n"
            "mapped = info().hblkhd\n"
            "ts = [torch.empty(5 << 20).fill_(1.0) for _ in range(5)]\n"
            "grown = info().hblkhd - mapped\n"
            "del ts\n"
            "print(grown, info().fordblks)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    grown, free = map(int, subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                          check=True).stdout.split())
    assert grown < (20 << 20) and free >= 100 << 20, (grown, free)
