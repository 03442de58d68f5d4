"""`driftscope eval --model` under torchrun (2 CPU processes, gloo): lm-eval deals the docs over the ranks and gathers
on rank 0; the scores and every logged sample equal one process's, including a rank lm-eval pads (3 docs on 2 ranks),
and the per-rank generation caches resume a run under another world size without generating again."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")
from eval_helpers import write_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
TASKS = "math500,headqa"  # generation with 3 samples per doc (avg@3), and multiple choice (log-likelihoods)


def _args(model, out, bench_dir) -> list[str]:
    return ["eval", "--model", str(model), "--tasks", TASKS, "--limit", "3", "--max-gen-toks", "8", "--data-dir",
            str(bench_dir), "--out", str(out)]


def _samples(out, name) -> list[dict]:
    keep = ("doc_id", "task", "filter", "target", "arguments", "resps", "filtered_resps")
    return [{k: row.get(k) for k in keep}
            for row in map(json.loads, (out / "samples" / f"{name}.jsonl").read_text().splitlines())]


def _close(a, b, path: str) -> bool:
    """Equal structure, strings, ints and bools; floats (log-likelihoods) within 1e-6 relative: a rank packs other
    sequences into a forward than one process does, so float32 sums run in another order."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return all(_close(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, list):
        assert len(a) == len(b), path
        return all(_close(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6), path
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"
    return True


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    from driftscope.cli import main

    root = tmp_path_factory.mktemp("eval-dist")
    model, bench_dir = write_model(root / "model", seed=5), shared_data / "benchmarks"
    assert main(_args(model, root / "one", bench_dir)) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "driftscope", *_args(model, root / "two", bench_dir), "--dist-timeout", "120"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return model, bench_dir, root / "one", root / "two", r


def test_two_processes_give_one_process_scores_and_samples(runs):
    _, _, one, two, r = runs
    a, b = (json.loads((o / "scores.json").read_text()) for o in (one, two))
    assert set(a["scores"]) == {"math500", "headqa"}
    for name in a["scores"]:
        assert b["scores"][name] == pytest.approx(a["scores"][name], rel=1e-12, abs=1e-12), name
        assert b["details"][name]["docs"] == a["details"][name]["docs"]
        sa, sb = _samples(one, name), _samples(two, name)
        assert _close(sa, sb, name)  # same docs, same order, same responses (no pad's copy among them)
    gens = [json.loads(x) for x in (one / "generations" / "ds_math500.jsonl").read_text().splitlines()]
    parts = [two / "generations" / f"ds_math500.rank{r}.jsonl" for r in (0, 1)]
    per_rank = [[json.loads(x) for x in p.read_text().splitlines()] for p in parts]
    assert [len(p) for p in per_rank] == [6, 3]  # docs 0 and 2 on rank 0, doc 1 on rank 1; 3 samples each
    key = lambda g: (g["key"], g["n"])  # noqa: E731
    assert sorted(map(key, gens)) == sorted(key(g) for p in per_rank for g in p)
    assert not (two / "generations" / "ds_math500.jsonl").exists()
    assert r.stdout.count("math500:") == 1  # rank 0 alone prints the scores
    # and alone shows lm-eval's bars: headqa's "Tokenizing inputs" once; rank 1 (one doc per benchmark) none
    assert r.stderr.count("Tokenizing inputs: 100%") == 1 and "| 1/1 [" not in r.stderr, r.stderr


def test_a_rerun_under_another_world_size_takes_the_per_rank_generations(runs, monkeypatch):
    from driftscope.engine import decoding
    from driftscope.eval.run import evaluate

    model, bench_dir, one, two, _ = runs
    (two / "lm_eval" / "ds_math500.json").unlink()  # math500 must be scored again, from the cached generations
    before = _samples(two, "math500")

    def refuse(*a, **k):
        raise AssertionError("a cached generation was generated again")

    monkeypatch.setattr(decoding.GenerationEngine, "run", refuse)
    got = evaluate(model, ["math500", "headqa"], two, data_dir=bench_dir, limit=3, max_gen_toks=8)
    assert got["scores"]["math500"] == json.loads((one / "scores.json").read_text())["scores"]["math500"]
    assert _samples(two, "math500") == before


def test_pads_are_found_by_identity():
    from driftscope.eval.lm_model import _pads

    class Req:
        def __init__(self, repeats):
            self.repeats = repeats

    a, b, c = Req(3), Req(3), Req(1)
    assert _pads([a, a, a, b, b, b, b, b, b]) == {6: 3, 7: 3, 8: 3}  # lm-eval appended [b] * 3 for one missing doc
    assert _pads([c, a, a, a, c]) == {4: 0}
    assert _pads([a, a, a, b, b, b]) == {}


def test_lm_evals_own_cli_under_torchrun_equals_one_process(runs, tmp_path):
    """The harness path: `torchrun -m driftscope lm-eval run --model driftscope ...` (lm-eval's CLI, its own data
    parallelism over DriftscopeLM's rank, world_size and collectives) gives one process's metrics."""
    from driftscope.cli import main

    model, bench_dir, _, _, _ = runs
    args = ["lm-eval", "run", "--model", "driftscope", "--model_args", f"pretrained={model}", "--tasks",
            "ds_mctaco,ds_math500", "--limit", "3", "--gen_kwargs", "max_gen_toks=8", "--metadata",
            json.dumps({"data_dir": str(bench_dir)}), "--output_path"]
    assert main([*args, str(tmp_path / "one")]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "driftscope", *args, str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("Initializing driftscope model") == 1, r.stderr  # lm-eval logs on rank 0 only
    one, two = ([json.loads(p.read_text()) for p in (tmp_path / side).rglob("results_*.json")] for side in
                ("one", "two"))
    assert len(one) == len(two) == 1  # rank 0 alone writes
    a, b = one[0]["results"], two[0]["results"]
    assert a.keys() == b.keys() == {"ds_mctaco", "ds_math500"}
    for task in a:
        for k, v in a[task].items():
            if isinstance(v, float) and "stderr" not in k:
                assert b[task][k] == pytest.approx(v, rel=1e-12, abs=1e-12), (task, k)
    assert one[0]["n-samples"] == two[0]["n-samples"]


def test_fewer_docs_than_processes_is_refused_before_the_model_loads(runs, monkeypatch, capsys, tmp_path):
    """lm-eval fails on a rank without docs ('build_requests() did not find any docs'): refused up front, naming the
    benchmark, its doc count and the number of processes (no process group is joined)."""
    from driftscope.cli import main

    model, bench_dir, _, _, _ = runs
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(["eval", "--model", str(model), "--tasks", "headqa,math500", "--limit", "1", "--data-dir",
                 str(bench_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "headqa has 1 doc (--limit 1) for 2 processes" in err, err
    assert not torch.distributed.is_initialized()
