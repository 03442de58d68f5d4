"""The shipped lm-eval tasks: every ds_* task and the ds_paper12 group are indexed, each task builds from local
files with the docs and prompts of eval.benchmarks, and `driftscope lm-eval` runs lm-eval's CLI with them."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")
from eval_helpers import write_model  # noqa: E402

from driftscope.eval import benchmarks as B  # noqa: E402
from driftscope.eval.run import TASKS_DIR  # noqa: E402

COQA_STORY = {"id": "s1", "story": "Cotton is a white kitten.",
              "questions": [{"input_text": "What color?", "turn_id": 1}],
              "answers": [{"input_text": "white", "turn_id": 1}]}


def _manager(data_dir, defaults: bool = False):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=defaults, metadata={"data_dir": str(data_dir)})


def test_every_task_and_the_group_are_indexed(tmp_path):
    tm = _manager(tmp_path, defaults=True)
    names = set(tm.all_tasks)
    assert {f"ds_{b}" for b in B.BENCHMARKS} | {"ds_paper12"} <= names
    assert {"ifeval", "mc_taco"} <= names  # lm-eval's own tasks are still there
    import yaml

    group = yaml.safe_load((TASKS_DIR / "ds_paper12.yaml").read_text())
    assert group["group"] == "ds_paper12" and group["task"] == [f"ds_{b}" for b in B.BENCHMARKS]
    assert "ds_paper12" in set(_manager(tmp_path).all_groups)


@pytest.mark.parametrize("name", list(B.BENCHMARKS))
def test_each_task_builds_from_local_files(shared_data, tmp_path, name):
    data_dir = shared_data / "benchmarks"
    if name == "coqa":  # not in ../shared/data: a fixture in the official layout
        data_dir = tmp_path
        (tmp_path / "coqa-dev-v1.0.json").write_text(json.dumps({"data": [COQA_STORY]}))
    task = _manager(data_dir).load([f"ds_{name}"])["tasks"][f"ds_{name}"]
    docs = list(task.test_docs())
    ours = B.load_docs(name, data_dir)
    assert len(docs) == len(ours)
    assert task.doc_to_text(docs[0]) == B.get(name).prompt(ours[0])
    b = B.get(name)
    if b.kind == "generate":
        assert task.config.repeats == b.k
        assert task.config.generation_kwargs.get("temperature", 0.0) == b.sampling["temperature"]
    else:
        assert task.doc_to_choice(docs[0]) == b.choices(ours[0])


def test_driftscope_lm_eval_runs_lm_evals_cli(shared_data, tmp_path):
    from driftscope.cli import main

    model = write_model(tmp_path / "m")
    rc = main(["lm-eval", "run", "--model", "driftscope", "--model_args", f"pretrained={model}", "--tasks", "ds_mctaco",
               "--limit", "3", "--metadata", json.dumps({"data_dir": str(shared_data / "benchmarks")}),
               "--output_path", str(tmp_path / "out")])
    assert rc == 0
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())["results"]["ds_mctaco"]
    assert 0.0 <= res["acc,none"] <= 1.0
    from driftscope.eval.scores import read_scores

    assert set(read_scores(results[0])) == {"mctaco"}


@pytest.mark.parametrize("name", ["ifeval", "mctaco", "headqa", "math500", "aime25", "gpqa_diamond", "acpbench"])
def test_upstream_tasks_run_on_the_local_files(shared_data, name):
    from driftscope.eval.upstream import upstream_configs

    data_dir = shared_data / "benchmarks"
    tasks = _manager(data_dir).load(upstream_configs(name, data_dir))["tasks"]
    ours = B.load_docs(name, data_dir)
    docs = [d for t in tasks.values() for d in (t.test_docs() if t.has_test_docs() else t.validation_docs())]
    assert len(docs) == len(ours)
    # where the ds_* task copies lm-eval's prompt, the two agree on every doc (ACPBench: after the two shots)
    task = next(iter(tasks.values()))
    first = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
    for d, mine in list(zip(first, ours))[:50]:
        theirs = task.doc_to_text(d)
        if name in ("ifeval", "mctaco", "headqa"):
            assert theirs == B.get(name).prompt(mine)
        elif name == "acpbench":
            assert B.get(name).prompt(mine).endswith(theirs) and B.get(name).prompt(mine).count("**Question**:") == 3


def test_upstream_eval_end_to_end(shared_data, tmp_path):
    from driftscope.eval.run import evaluate

    model = write_model(tmp_path / "m")
    res = evaluate(model, ["mctaco"], tmp_path / "out", data_dir=shared_data / "benchmarks", limit=4, upstream=True)
    assert 0 <= res["scores"]["mctaco"] <= 100
    assert res["details"]["mctaco"]["tasks"] == ["mc_taco"] and res["details"]["mctaco"]["upstream"] is True
    with pytest.raises(ValueError, match="upstream=True, not False"):
        evaluate(model, ["mctaco"], tmp_path / "out", data_dir=shared_data / "benchmarks", limit=4)
    with pytest.raises(ValueError, match="olympiadbench has no upstream lm-eval task"):
        evaluate(model, ["olympiadbench"], tmp_path / "o2", data_dir=shared_data / "benchmarks", upstream=True)
