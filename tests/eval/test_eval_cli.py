"""End to end, offline, on tiny checkpoints: `driftscope eval` on three benchmarks with --limit for a base and a
tuned model, a resumed rerun, then `driftscope ti` on the two scores.json files."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")
from eval_helpers import write_model  # noqa: E402

from driftscope.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def _model_folder(tmp_path):
    """`--model tmp_path` names a checkpoint folder (its config.json is enough for the up-front check): these tests
    are about what is refused after it."""
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-cli")
    return write_model(root / "base", seed=3), write_model(root / "tuned", seed=4)


def _eval(model, out, bench_dir, tasks="math500,headqa,ifeval"):
    return main(["eval", "--model", str(model), "--tasks", tasks, "--limit", "2", "--max-gen-toks", "8",
                 "--data-dir", str(bench_dir), "--out", str(out)])


def test_eval_then_ti(pair, shared_data, tmp_path, capsys):
    bench_dir = shared_data / "benchmarks"
    base, tuned = pair
    assert _eval(base, tmp_path / "base", bench_dir) == 0
    assert _eval(tuned, tmp_path / "tuned", bench_dir) == 0
    for side in ("base", "tuned"):
        scores = json.loads((tmp_path / side / "scores.json").read_text())
        assert set(scores["scores"]) == {"math500", "headqa", "ifeval"}
        assert all(0 <= v <= 100 for v in scores["scores"].values())
        assert (tmp_path / side / "lm_eval" / "ds_math500.json").is_file()
        samples = [json.loads(line) for line in open(tmp_path / side / "samples" / "math500.jsonl")]
        assert len(samples) == 2 and all(len(s["resps"][0]) == len(s["filtered_resps"][0]) == 3 for s in samples)  # k=3
        gens = (tmp_path / side / "generations" / "ds_math500.jsonl").read_text().splitlines()
        assert len(gens) == 6
    capsys.readouterr()
    # a rerun with the same options keeps what is done
    assert _eval(base, tmp_path / "base", bench_dir) == 0
    # another option is refused, naming it
    assert main(["eval", "--model", str(base), "--tasks", "math500", "--limit", "3", "--data-dir", str(bench_dir),
                 "--out", str(tmp_path / "base")]) == 2
    assert "limit=2, not 3" in capsys.readouterr().err
    rc = main(["ti", "--base", str(tmp_path / "base" / "scores.json"), "--tuned",
               f"tiny={tmp_path / 'tuned' / 'scores.json'}", "--out", str(tmp_path / "ti")])
    out = capsys.readouterr().out
    assert rc == 0 and "tiny" in out
    ti = json.loads((tmp_path / "ti" / "ti.json").read_text())
    assert "tiny" in json.dumps(ti)
    assert (tmp_path / "ti" / "ti.html").is_file()


def test_resumed_generations_are_not_redone(pair, shared_data, tmp_path):
    from driftscope.eval.run import evaluate

    bench_dir = shared_data / "benchmarks"
    base, _ = pair
    first = evaluate(base, ["math500"], tmp_path / "a", data_dir=bench_dir, limit=2, max_gen_toks=8)
    # drop the finished benchmark but keep its generations: the rerun must reuse them, byte for byte
    (tmp_path / "a" / "lm_eval" / "ds_math500.json").unlink()
    cache = tmp_path / "a" / "generations" / "ds_math500.jsonl"
    lines = cache.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    rows[0]["text"] = "Final Answer: \\boxed{(3,\\frac{\\pi}{2})}"  # a planted answer shows the cache is read
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "torn')  # and a torn last line
    second = evaluate(base, ["math500"], tmp_path / "a", data_dir=bench_dir, limit=2, max_gen_toks=8)
    assert second["scores"]["math500"] > first["scores"]["math500"] or first["scores"]["math500"] > 0
    samples = [json.loads(line) for line in open(tmp_path / "a" / "samples" / "math500.jsonl")]
    assert rows[0]["text"] in [r for s in samples for r in s["filtered_resps"][0]]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--tasks", "nosuch", "--out", str(tmp_path / "o")]) == 2
    assert "unknown benchmark 'nosuch'" in capsys.readouterr().err
    assert main(["eval", "--responses", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "--responses needs --benchmark" in capsys.readouterr().err


def test_ifeval_readiness_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import driftscope.eval.graders.ifeval as ifeval

    def broken(*a, **k):
        raise RuntimeError("NLTK cannot load the punkt_tab written under /nowhere (LookupError)")

    monkeypatch.setattr(ifeval, "check_ifeval_ready", broken)
    # the model folder is empty (no tokenizer.json, no weights): the punkt check must come first
    assert main(["eval", "--model", str(tmp_path), "--tasks", "ifeval", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ifeval cannot be graded here: NLTK cannot load the punkt_tab" in err


def test_damaged_state_files_are_named(shared_data, tmp_path, capsys):
    bench_dir = shared_data / "benchmarks"
    out = tmp_path / "o"
    out.mkdir()
    (out / "eval_run.json").write_text('{"model": "x",\n  "limit": ')
    assert main(["eval", "--model", str(tmp_path), "--tasks", "aime24", "--data-dir", str(bench_dir),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out / 'eval_run.json'}:2:" in err and "eval run state is not valid JSON" in err
    resp = tmp_path / "r.jsonl"
    resp.write_text("".join(json.dumps({"output": "\\boxed{1}"}) + "\n" for _ in range(30)))
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "scores.json").write_text("[1, 2]")
    assert main(["eval", "--benchmark", "aime24", "--responses", str(resp), "--data-dir", str(bench_dir),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "scores file must hold a JSON object, got list" in capsys.readouterr().err


def test_util_json_helpers(tmp_path):
    from driftscope.util import read_json, write_json

    p = write_json(tmp_path / "a" / "x.json", {"nan": float("nan"), "inf": [float("inf"), 1.5]})
    assert read_json(p) == {"nan": None, "inf": [None, 1.5]}
    assert not list((tmp_path / "a").glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="state file .*nope.json does not exist"):
        read_json(tmp_path / "nope.json", "state file")
    with pytest.raises(ValueError, match="is a directory"):
        read_json(tmp_path / "a")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_json(tmp_path / "bad.json")


def test_env_info_is_computed_once_and_copied(monkeypatch):
    """lm-eval's add_env_info (torch's collect_env: subprocesses) runs once per process; every benchmark's results
    get an equal, independent copy of the same fields."""
    import lm_eval.evaluator as ev

    from driftscope.eval.run import _env_info_once

    calls = []

    def fake(storage):
        calls.append(1)
        storage.update({"pretty_env_info": f"env {len(calls)}", "nested": {"a": [1]}})

    monkeypatch.setattr(ev, "add_env_info", fake)
    _env_info_once()
    _env_info_once()  # idempotent: not wrapped twice
    a, b = {"results": 1}, {}
    ev.add_env_info(a)
    ev.add_env_info(b)
    assert calls == [1]
    import importlib.metadata

    version = {"transformers_version": importlib.metadata.version("transformers")}
    assert a == {"results": 1, "pretty_env_info": "env 1", "nested": {"a": [1]}, **version}
    assert b == {"pretty_env_info": "env 1", "nested": {"a": [1]}, **version}
    a["nested"]["a"].append(2)
    assert b["nested"] == {"a": [1]}


def test_env_info_equals_lm_evals_without_importing_transformers():
    """The wrapped add_env_info stores what lm-eval's own stores, and never imports transformers to read its
    version (a fresh process: nothing imported it before)."""
    import subprocess
    import sys

    code = """if True:
        import json, sys
        import lm_eval.evaluator as ev
        from driftscope.eval.run import _env_info_once
        original = ev.add_env_info
        _env_info_once()
        ours = {}
        ev.add_env_info(ours)
        imported = "transformers" in sys.modules
        theirs = {}
        original(theirs)
        print(json.dumps({"imported": imported, "equal": ours == theirs, "keys": sorted(ours)}))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"imported": False, "equal": True, "keys": ["lm_eval_version", "pretty_env_info",
                                                              "transformers_version", "upper_git_hash"]}
