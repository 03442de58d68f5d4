"""Data-parallel drift under torchrun (2 CPU processes, gloo): the same summary as one process, also after an
interrupted run is resumed under torchrun; a resume under another number of processes is refused."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from analysis_helpers import write_records

from driftscope import drift
from driftscope.drift_run.bundle import TaskProbes, merge_kind
from driftscope.distributed import World
from driftscope.errors import InputError
from driftscope.report import read_token_table

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
OPTS = {"progress": False, "max_batch_tokens": 64, "checkpoint_every": 0}
REL = 1e-12  # float64 sums added in another order; integers (tokens, histograms, token counts) must be equal
WORKER = """import sys
import driftscope.report
from driftscope.drift_run import run as run_mod
from driftscope.cli import main

at, original, calls = int(sys.argv[1]), run_mod._Run.process, {"n": 0}


def flaky(self, k, batch):  # Ctrl-C in each rank's batch `at` (0: never): the batches before it are checkpointed
    calls["n"] += 1
    if calls["n"] == at:
        raise KeyboardInterrupt
    return original(self, k, batch)


run_mod._Run.process = flaky
original_generate = run_mod._Run.generate


def flaky_generate(self, *args):  # --generate: Ctrl-C in each rank's prompt chunk `at` instead
    calls["n"] += 1
    if calls["n"] == at:
        raise KeyboardInterrupt
    return original_generate(self, *args)


run_mod._Run.generate = flaky_generate
driftscope.report.write_report = lambda out, summary: out / "report.html"  # plots take seconds: the plain run has them
sys.exit(main(sys.argv[2:]))
"""


def _compare(a, b, path="", worst=None) -> float:
    """The largest relative difference of two summaries' floats; ints, strings and structure must be equal."""
    worst = [0.0] if worst is None else worst
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _compare(a[k], b[k], f"{path}.{k}", worst)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, f"{path}[{i}]", worst)
    elif isinstance(a, float) and isinstance(b, float):
        rel = abs(a - b) / max(abs(a), abs(b)) if a != b else 0.0
        assert rel <= REL or math.isclose(a, b, abs_tol=1e-15), f"{path}: {a!r} vs {b!r} (relative {rel:.3g})"
        worst[0] = max(worst[0], rel)
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"
    return worst[0]


@pytest.fixture(scope="module")
def inputs(models, records, tmp_path_factory):
    short = write_records(tmp_path_factory.mktemp("short") / "short.jsonl", n=6)
    return {"base": models["base"], "tuned": [models["tuned"], models["late"]], "data": [records, short]}


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory):
    import driftscope.report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driftscope.report, "write_report", lambda out, summary: out / "report.html")
        report = drift(inputs["base"], inputs["tuned"], inputs["data"], tmp_path_factory.mktemp("one"), **OPTS)
    return report.summary, read_token_table(report.files["tokens"])


def _torchrun(inputs, out: Path, *extra: str, worker: tuple = (), env: dict | None = None
              ) -> subprocess.CompletedProcess:
    """`torchrun -m driftscope drift ...` on 2 CPU processes, or `torchrun WORKER_SCRIPT AT drift ...`."""
    target = [str(x) for x in worker] or ["-m", "driftscope"]
    args = ["drift", "--base", str(inputs["base"]), "--out", str(out), "--max-batch-tokens", "64",
            "--checkpoint-every", "0", "--no-progress", "--dist-timeout", "120", *extra]
    args += [x for t in inputs["tuned"] for x in ("--tuned", str(t))]
    args += [x for d in inputs["data"] for x in ("--data", str(d))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("worker") / "worker.py"
    script.write_text(WORKER)
    return script


@pytest.fixture(scope="module")
def interrupted(inputs, worker, tmp_path_factory):
    """A 2-rank run into `out`, each rank interrupted by Ctrl-C in its third batch (or stopped sooner by torchrun,
    which ends the group when a process fails)."""
    out = tmp_path_factory.mktemp("cut") / "out"
    r = _torchrun(inputs, out, worker=(worker, 3))
    assert r.returncode != 0 and "interrupted; continue with the same command plus --resume" in r.stderr, \
        r.stderr[-3000:]
    assert "internal error" not in r.stderr, r.stderr[-3000:]  # a rank's broken collective is not reported as a bug
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_two_processes_give_the_summary_of_one(inputs, one_process, tmp_path):
    r = _torchrun(inputs, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "summary.json").read_text())
    summary, tokens = one_process
    worst = _compare(json.loads(json.dumps(summary["models"])), got["models"])
    print(f"largest relative difference: {worst:.3g}")
    assert read_token_table(next(tmp_path.glob("tokens.*"))) == tokens
    assert got["timing"]["processes"] == 2 and got["timing"]["tokens"] == summary["timing"]["tokens"]
    assert got["timing"]["scored_tokens"] == summary["timing"]["scored_tokens"] > 0  # gathered from both ranks
    assert not (tmp_path / ".driftscope-state").exists() and (tmp_path / "report.html").is_file()
    assert r.stdout.count(" tokens, ") == 4, r.stdout  # rank 0's lines, one per (model, task): rank 1 prints none


def test_an_interrupted_two_process_run_resumes_under_torchrun(inputs, one_process, interrupted, worker, tmp_path):
    out = _copy(interrupted, tmp_path / "out")
    done = []
    for rank in (0, 1):
        progress = json.loads((out / ".driftscope-state" / f"rank{rank}" / "progress.json").read_text())
        assert progress["world_size"] == 2, progress
        done.append(sum(progress["done"].values()))
    assert 0 < max(done) <= 2, done
    assert not (out / "summary.json").exists()
    r = _torchrun(inputs, out, "--resume", worker=(worker, 0))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((out / "summary.json").read_text())
    _compare(json.loads(json.dumps(one_process[0]["models"])), got["models"])
    assert read_token_table(next(out.glob("tokens.*"))) == one_process[1]
    assert not (out / ".driftscope-state").exists()


def test_a_resume_with_another_number_of_processes_is_refused(inputs, interrupted, tmp_path):
    out = _copy(interrupted, tmp_path / "out")
    saved = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(InputError) as exc:
        drift(inputs["base"], inputs["tuned"], inputs["data"], out, resume=True, **OPTS)
    msg = str(exc.value)
    assert msg == (f"cannot resume {out}: the interrupted run ran as 2 processes (torchrun WORLD_SIZE 2), this run "
                   "as one process; resume it with 2 processes, or pass --overwrite to start over"), msg
    with pytest.raises(InputError, match=r"holds an interrupted run \(.* done by 2 processes, saved "):
        drift(inputs["base"], inputs["tuned"], inputs["data"], out, **OPTS)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == saved, "a refusal touched the state"


GEN = {"generate": True, "max_new_tokens": 5, "generate_chunk": 2, "temperature": 0.8, "seed": 3}


GEN_FLAGS = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in GEN.items()]
# torchrun sets OMP_NUM_THREADS=1, and MKL's fp32 GEMMs round differently with another thread count (KL means ~1e-8
# apart, measured): the --generate runs compare at the thread count of this process
THREADS = {"OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture(scope="module")
def gen_one(inputs, tmp_path_factory) -> Path:
    import driftscope.report

    out = tmp_path_factory.mktemp("gen-one")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driftscope.report, "write_report", lambda out, summary: out / "report.html")
        drift(inputs["base"], inputs["tuned"], inputs["data"], out, **GEN, **OPTS)
    return out


def _same_generate_outputs(one: Path, two: Path) -> None:
    a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    _compare(a["models"], b["models"])
    files = sorted(p.relative_to(one) for p in (one / "responses").rglob("*.jsonl"))
    assert len(files) == 4  # 2 tuned models x 2 tasks
    for f in files:
        assert (two / f).read_bytes() == (one / f).read_bytes(), f
    assert not (two / ".driftscope-state").exists()


def test_drift_generate_under_two_processes_equals_one(inputs, gen_one, tmp_path):
    """--generate: the prompt chunks of every (tuned model, task) are dealt over the ranks; the summary and the
    responses equal one process's."""
    r = _torchrun(inputs, tmp_path, *GEN_FLAGS, env=THREADS)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_generate_outputs(gen_one, tmp_path)
    timing = [json.loads((d / "summary.json").read_text())["timing"] for d in (gen_one, tmp_path)]
    assert timing[1]["processes"] == 2 and timing[1]["tokens"] == timing[0]["tokens"]


def test_drift_generate_interrupted_under_torchrun_resumes(inputs, gen_one, worker, tmp_path):
    r = _torchrun(inputs, tmp_path, *GEN_FLAGS, worker=(worker, 3), env=THREADS)
    assert r.returncode != 0 and "internal error" not in r.stderr, r.stderr[-3000:]
    done = [sum(json.loads((tmp_path / ".driftscope-state" / f"rank{rank}" / "progress.json").read_text())
                ["gen_done"].values()) for rank in (0, 1)]
    assert 0 < max(done) <= 2, done  # chunks kept from the interrupted run
    r = _torchrun(inputs, tmp_path, *GEN_FLAGS, "--resume", worker=(worker, 0), env=THREADS)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_generate_outputs(gen_one, tmp_path)  # (timing.tokens counts this run's tokens: fewer)


# ---- the pieces, in one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_shards_are_disjoint_deterministic_and_balanced_by_tokens(size):
    sizes = [[64, 60, 12, 64, 33], [5], [64, 64, 64, 40, 2, 17, 64]]
    shards = [World(rank=r, size=size).shard(sizes) for r in range(size)]
    assert shards == [World(rank=r, size=size).shard(sizes) for r in range(size)]
    for k, s in enumerate(sizes):
        got = sorted(i for sh in shards for i in sh[k])
        assert got == list(range(len(s))), (k, shards)
    loads = [sum(sizes[k][i] for k, idx in enumerate(sh) for i in idx) for sh in shards]
    assert max(loads) - min(loads) <= 64, loads
    assert World().shard(sizes) == [list(range(len(s))) for s in sizes]


def test_the_world_comes_from_torchruns_environment():
    assert World.from_env({}) == World() and World.from_env({"WORLD_SIZE": "1"}) == World()
    assert World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(rank=3, size=4, local_rank=1)
    with pytest.raises(InputError, match="WORLD_SIZE='2', RANK=None"):
        World.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="RANK=2 lies outside WORLD_SIZE=2"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def _probes(n_tuned=2, n_states=3, d=8):
    return TaskProbes(n_tuned, n_states, d, vocab_rows=50, pca="streaming", cka="full", cka_proj_dim=4)


def _feed(probes, sample_ids, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(sample_ids)
    for layer in range(probes.n_states):
        probes.on_layer(layer, torch.randn(n, 8, generator=g), [torch.randn(n, 8, generator=g) for _ in range(2)])
    targets = torch.randint(0, 50, (n,), generator=g)
    for j in range(2):
        r = {k: torch.rand(n, generator=g, dtype=torch.float64) for k in ("kl_tb", "kl_bt", "logp_base", "logp_tuned",
                                                                           "entropy_base", "entropy_tuned")}
        r.update({k: torch.randint(1, 9, (n,), generator=g) for k in ("rank_base", "rank_tuned", "rank_shift_top",
                                                                       "top_base", "top_tuned")})
        probes.on_vocab(j, r, targets, torch.tensor(sample_ids), torch.arange(n) % 3 == 0)


def test_state_keys_merge_like_the_accumulators():
    """Summing / concatenating / keeping each state key as merge_kind says (what World.merge does across ranks,
    with zeros for the layer sums a rank without batches lacks) equals the accumulators' own merge."""
    parts = [_probes(), _probes(), _probes()]  # the third ran no batch
    _feed(parts[0], [0, 0, 2, 5, 5, 5], seed=1)
    _feed(parts[1], [1, 3, 3, 4], seed=2)
    states = [p.state_dict() for p in parts]
    keys = sorted({k for s in states for k in s})
    assert len(keys) > len(states[2]), "a rank without batches should lack the layer sums"
    combined = {}
    for key in keys:
        have = [s[key] for s in states if key in s]
        kind = merge_kind(key)
        combined[key] = sum(have[1:], have[0].clone()) if kind == "sum" else torch.cat(have) if kind == "cat" \
            else states[0][key]
    got = _probes()
    got.load_state_dict(combined)
    want = parts[0]
    for other in parts[1:]:
        for a, b in zip(want.pairs, other.pairs):
            for kind, acc in a.parts().items():  # token metrics, shifted tokens, llama.cpp's KLD statistics
                acc.merge(b.parts()[kind])
        want.hidden[0].merge(other.hidden[0])
        want.pcas[0].merge(other.pcas[0])
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad
    assert {merge_kind(k) for k in keys} == {"sum", "cat", "first"}
    assert merge_kind("m0.paper_pca.base.3") == "first"


def test_device_flags_under_torchrun_name_each_process_its_group_of_gpus():
    """--base-device cuda:0 --tuned-device cuda:1 with 4 processes on 8 GPUs: rank l on GPUs 2l and 2l + 1."""
    for local in range(4):
        w = World(rank=local, size=4, local_rank=local)
        assert w.rank_devices("cuda:0", ["cuda:1"], 8) == (f"cuda:{2 * local}", [f"cuda:{2 * local + 1}"])
        assert w.rank_devices("cuda", ["cuda:1", "cuda:2"], 12) == (f"cuda:{3 * local}",
                                                                    [f"cuda:{3 * local + 1}", f"cuda:{3 * local + 2}"])
        assert w.rank_devices("cpu", ["cpu"], 0) == ("cpu", ["cpu"])
    # two nodes: LOCAL_RANK, not RANK, picks the GPUs
    assert World(rank=5, size=8, local_rank=1).rank_devices("cuda:0", ["cuda:1"], 8) == ("cuda:2", ["cuda:3"])
    with pytest.raises(InputError, match=r"LOCAL_RANK=3 with 3 GPUs per process \(--base-device/--tuned-device up to "
                                         r"cuda:2\) needs cuda:9..cuda:11, but this node has 8 CUDA device"):
        World(rank=3, size=4, local_rank=3).rank_devices("cuda:0", ["cuda:2"], 8)


def test_device_flags_under_torchrun_on_the_cpu_give_the_summary_of_one(inputs, one_process, tmp_path):
    r = _torchrun(inputs, tmp_path, "--base-device", "cpu", "--tuned-device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "summary.json").read_text())
    _compare(json.loads(json.dumps(one_process[0]["models"])), got["models"])
    assert got["config"]["base_device"] == "cpu" and got["timing"]["processes"] == 2


def test_lens_and_examples_under_two_processes_equal_one(inputs, tmp_path):
    """--lens all --examples 3 under torchrun: each rank's lens sums and top-k stores, merged on rank 0, give the
    summary of one process (the lens and self-lens curves, the promoted tokens, the examples) and its
    examples table."""
    import driftscope.report

    flags = {"lens": "all", "examples": 3}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driftscope.report, "write_report", lambda out, summary: out / "report.html")
        one = drift(inputs["base"], inputs["tuned"], inputs["data"], tmp_path / "one", **OPTS, **flags).summary
    r = _torchrun(inputs, tmp_path / "two", "--lens", "all", "--examples", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "two" / "summary.json").read_text())
    for name, model in one["models"].items():
        for task, block in model["tasks"].items():
            for key in ("lens", "self_lens", "promoted_tokens", "examples"):
                assert key in block, (name, task, key)
                _compare(json.loads(json.dumps(block[key])), got["models"][name]["tasks"][task][key],
                         f"{name}.{task}.{key}")
    pq = pytest.importorskip("pyarrow.parquet")
    a, b = (pq.read_table(p / "examples.parquet").to_pylist() for p in (tmp_path / "one", tmp_path / "two"))
    assert len(a) > 0 and len(a) == len(b)
    for x, y in zip(a, b):
        _compare(x, y, "examples.parquet")
