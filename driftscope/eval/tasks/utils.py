"""Functions the shipped lm-eval task YAMLs point to (`!function utils.<name>`): data loading, prompts, grading.

Everything is defined once in `driftscope.eval.benchmarks`; this module only adapts it to lm-eval's hooks.
The data folder comes from lm-eval's metadata (`--metadata '{"data_dir": "..."}'`, or `driftscope eval
--data-dir`), else from the environment variable DRIFTSCOPE_DATA_DIR, else the benchmark's Hugging Face dataset.
"""
from __future__ import annotations

import os
from functools import partial

from driftscope.eval import benchmarks as B


def _load(name: str, **kwargs):
    import datasets

    if name == "ifeval":  # NLTK's punkt data in place now, while the data loads, not at scoring after generation
        from driftscope.eval.graders.ifeval import check_ifeval_ready

        check_ifeval_ready()
    data_dir = kwargs.get("data_dir") or os.environ.get("DRIFTSCOPE_DATA_DIR") or None
    docs = B.load_docs(name, data_dir)
    for i, d in enumerate(docs):
        d.setdefault("doc_index", i)
    return {"test": datasets.Dataset.from_list(docs)}


def _prompt(name: str, doc: dict) -> str:
    return B.get(name).prompt(doc)


def _target(name: str, doc: dict):
    gold = B.get(name).gold(doc)
    return gold if isinstance(gold, (int, str)) else str(gold)


def _choices(name: str, doc: dict) -> list[str]:
    return B.get(name).choices(doc)


def _process(name: str, doc: dict, results: list) -> dict[str, float]:
    """lm-eval hands one filtered response per request; with `repeats` + take_first_k it is a list of k."""
    responses = results[0] if results and isinstance(results[0], list) else results
    bench = B.get(name)
    grades = [bench.grade(r, doc) for r in responses]
    if any(isinstance(g, list) for g in grades):  # IFEval: every instruction counts once (instruction level)
        return {"score": [float(x) for g in grades for x in g]}
    return {"score": sum(grades) / len(grades)}  # the mean over the k samples


def flat_mean(items: list) -> float:
    """Mean over docs; a doc's list (IFEval's instructions) enters element by element."""
    return B.score_of(items) / 100.0


for _name in B.BENCHMARKS:
    globals()[f"load_{_name}"] = partial(_load, _name)
    globals()[f"prompt_{_name}"] = partial(_prompt, _name)
    globals()[f"target_{_name}"] = partial(_target, _name)
    globals()[f"choices_{_name}"] = partial(_choices, _name)
    globals()[f"process_{_name}"] = partial(_process, _name)
