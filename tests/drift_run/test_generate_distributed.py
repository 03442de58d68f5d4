"""`driftscope generate` under torchrun (2 CPU processes, gloo): the OUT of one process, byte for byte, also after an
interrupted run is resumed under torchrun and when a rank has no prompt; a resume under another number of processes
is refused and leaves the state alone; `shard_records` deals disjoint shares balanced by token cost."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from driftscope.distributed import World
from driftscope.responses import shard_records
from driftscope.cli import main
from driftscope.engine.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
SAMPLING = ["--temperature", "0.8", "--top-p", "0.9", "-n", "2", "--seed", "3", "--max-new-tokens", "8"]
AT = 2  # rank 1 of the interrupted run stops after this many finished rows
WORKER = """import os
import sys

from driftscope.cli import main
from driftscope.engine.decoding import GenerationEngine

rank, at, real = int(os.environ["RANK"]), int(sys.argv[1]), GenerationEngine.run


def run_then_stop(self, requests, **kw):  # Ctrl-C on rank 1 after `at` finished rows, each already in its partial
    for k, g in enumerate(real(self, requests, **kw)):
        if rank == 1 and k == at:
            raise KeyboardInterrupt
        yield g


GenerationEngine.run = run_then_stop
sys.exit(main(sys.argv[2:]))
"""


def _prompts(path: Path, n: int) -> Path:
    """`n` prompts of unequal lengths, and a broken line (a skipped record that only rank 0 reports)."""
    rows = [json.dumps({"prompt": f"Question {i}: " + "what is the sum of these numbers? " * (i % 4) + f"{i} + {i}"})
            for i in range(n)]
    rows.insert(1, "{broken")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress", *SAMPLING,
            *extra]


def _torchrun(model: Path, data: Path, out: Path, *extra: str, worker: tuple = ()) -> subprocess.CompletedProcess:
    """`torchrun -m driftscope generate ...` on 2 CPU processes, or `torchrun WORKER_SCRIPT AT generate ...`."""
    target = [str(x) for x in worker] or ["-m", "driftscope"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target,
           *_args(model, data, out, "--dist-timeout", "120", *extra)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _partial_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _prompts(tmp_path_factory.mktemp("prompts") / "p.jsonl", 7)


@pytest.fixture(scope="module")
def one_process(models, data, tmp_path_factory) -> bytes:
    """The reference: the OUT of one process, run in this one."""
    out = tmp_path_factory.mktemp("one") / "r.jsonl"
    assert main(_args(models["tuned"], data, out)) == 0
    return out.read_bytes()


@pytest.fixture(scope="module")
def interrupted(models, data, tmp_path_factory) -> Path:
    """A 2-rank run into `cut/r.jsonl`, rank 1 stopped by Ctrl-C after AT rows (rank 0 then ended by torchrun)."""
    worker = tmp_path_factory.mktemp("worker") / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path_factory.mktemp("cut") / "r.jsonl"
    r = _torchrun(models["tuned"], data, out, worker=(worker, AT))
    assert r.returncode != 0 and "interrupted; rerun the same torchrun command (2 processes) to continue (" \
        f"{out}.partial.rank* keep what was done)" in r.stderr, r.stderr[-3000:]
    assert "internal error" not in r.stderr, r.stderr[-3000:]  # rank 0's broken gather is not reported as a bug
    return out


def _rows(partial: Path) -> int:
    """The complete rows of a partial file (a kill may cut its last line), checking its fingerprint's world size."""
    lines = partial.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["fingerprint"]["world_size"] == 2
    rows = 0
    for line in lines[1:]:
        try:
            json.loads(line)
            rows += 1
        except ValueError:
            pass
    return rows


def test_two_processes_write_the_out_of_one(models, data, one_process, tmp_path):
    out = tmp_path / "r.jsonl"
    r = _torchrun(models["tuned"], data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == one_process
    assert _partial_files(tmp_path) == []
    lines = r.stdout.splitlines()  # rank 0's summary only
    assert len(lines) == 1 and lines[0].startswith(f"14 responses -> {out} (0 from the interrupted run; ") \
        and lines[0].endswith(", 2 processes)"), r.stdout
    assert r.stderr.count("invalid JSON") == 2, r.stderr  # rank 0's warning and its "records skipped" line
    assert r.stderr.count("1 record skipped: ") == 2, r.stderr  # the same two lines


def test_an_interrupted_two_process_run_resumes_under_torchrun(models, data, one_process, interrupted, tmp_path):
    out = tmp_path / "r.jsonl"
    for p in interrupted.parent.iterdir():
        shutil.copy(p, tmp_path / p.name)
    assert not out.exists()
    assert _partial_files(tmp_path) == ["r.jsonl.partial.rank0", "r.jsonl.partial.rank1"]
    done = [_rows(tmp_path / f"r.jsonl.partial.rank{r}") for r in (0, 1)]
    assert done[1] == AT, done
    r = _torchrun(models["tuned"], data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == one_process
    assert _partial_files(tmp_path) == []
    assert f"14 responses -> {out} ({sum(done)} from the interrupted run; " in r.stdout, (done, r.stdout)


def test_a_resume_with_another_number_of_processes_is_refused(models, data, one_process, interrupted, tmp_path,
                                                              monkeypatch, capsys):
    out = tmp_path / "r.jsonl"
    for p in interrupted.parent.iterdir():
        shutil.copy(p, tmp_path / p.name)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    want = (f"driftscope generate: error: cannot continue {out}.partial.rank*: the interrupted run ran as 2 processes "
            "(torchrun WORLD_SIZE 2), this run as {}; rerun it with 2 processes to finish it, or pass --restart to "
            "discard it")
    capsys.readouterr()
    assert main(_args(models["tuned"], data, out)) == 2
    assert capsys.readouterr().err.strip() == want.format("one process")
    with monkeypatch.context() as mp:  # refused before joining a process group: no other rank is needed
        for k, v in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}.items():
            mp.setenv(k, v)
        assert main(_args(models["tuned"], data, out)) == 2
    assert capsys.readouterr().err.strip() == want.format("3 processes (torchrun WORLD_SIZE 3)")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved, "a refusal touched the state"
    assert main(_args(models["tuned"], data, out, "--restart")) == 0  # discards the 2-rank files, starts over
    assert out.read_bytes() == one_process
    assert _partial_files(tmp_path) == []


def test_a_rank_without_prompts_still_takes_part(models, tmp_path):
    data = _prompts(tmp_path / "one.jsonl", 1)  # one record, its 2 samples on rank 0: rank 1 generates nothing
    assert main(_args(models["tuned"], data, tmp_path / "ref.jsonl")) == 0
    out = tmp_path / "r.jsonl"
    r = _torchrun(models["tuned"], data, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert _partial_files(tmp_path) == []
    assert r.stdout.startswith(f"2 responses -> {out} (0 from") and r.stdout.count("\n") == 1, r.stdout


# ---- the sharding, in one process -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 8], ids=lambda s: f"K{s}")
def test_shard_records_are_disjoint_cover_all_and_balance_token_cost(size):
    prompt_tokens = [5, 31, 2, 17, 40, 9, 9]  # 40 + max_new exceeds the context: its cost is capped there
    params, context = SamplingParams(n=3, max_new_tokens=8), 44
    cost = [3 * min(t + 8, context) for t in prompt_tokens]
    shards = [shard_records(World(rank=r, size=size), prompt_tokens, params, context) for r in range(size)]
    assert shards == [shard_records(World(rank=r, size=size), prompt_tokens, params, context) for r in range(size)]
    assert sorted(i for s in shards for i in s) == list(range(len(prompt_tokens))), shards
    assert all(s == sorted(s) for s in shards), shards
    loads = [sum(cost[i] for i in s) for s in shards]
    if size <= len(prompt_tokens):
        assert max(loads) - min(loads) <= max(cost), (loads, shards)
    else:  # more ranks than records: one record each, the rest none
        assert sorted(len(s) for s in shards) == [0] * (size - len(prompt_tokens)) + [1] * len(prompt_tokens)
