"""The shipped lm-eval task YAMLs, driftscope/eval/tasks/ds_*.yaml, as `driftscope.eval.benchmarks` defines them.

They are generated: after changing a Benchmark, `python tests/eval/task_yamls.py` rewrites them, and
test_benchmarks.py fails while one differs. A development tool, so it lives here and not in the package.
"""
from __future__ import annotations

import json
from pathlib import Path

from driftscope.eval import benchmarks as B
from driftscope.eval.run import TASKS_DIR

MAX_GEN_TOKS = 32768
_TASK = """\
# {n} ({group} group), generated from eval/benchmarks.py by `python tests/eval/task_yamls.py`: do not edit
task: ds_{n}
tag: [ds_paper]
custom_dataset: !function utils.load_{n}
test_split: test
doc_to_text: !function utils.prompt_{n}
{body}    higher_is_better: true
metadata:
  version: 1.0
"""
_BODY = {"loglikelihood": """\
output_type: multiple_choice
doc_to_choice: !function utils.choices_{n}
doc_to_target: !function utils.target_{n}
metric_list:
  - metric: acc
    aggregation: mean
""", "generate": """\
output_type: generate_until
doc_to_target: !function utils.target_{n}
generation_kwargs: {gen}
repeats: {k}
filter_list:
  - name: all_samples
    filter:
      - function: take_first_k
        k: {k}
process_results: !function utils.process_{n}
metric_list:
  - metric: score
    aggregation: !function utils.flat_mean
"""}
_GROUP = """\
# The paper's 12 benchmarks (Huan et al., arXiv 2507.00432, Table 1) as one lm-eval group. No aggregate: the
# members report different metrics; the Transferability Index (driftscope ti) is the suite's summary.
# Generated from eval/benchmarks.py by `python tests/eval/task_yamls.py`: do not edit.
group: ds_paper12
task:
{tasks}metadata:
  version: 1.0
"""


def task_yamls() -> dict[str, str]:
    """{file name: text} of every shipped task YAML: ds_<name>.yaml per benchmark, and the ds_paper12 group."""
    files = {}
    for n, b in B.BENCHMARKS.items():
        gen = {"until": list(b.until), "max_gen_toks": MAX_GEN_TOKS, "do_sample": b.sampling["temperature"] > 0,
               **b.sampling}
        files[f"ds_{n}.yaml"] = _TASK.replace("{body}", _BODY[b.kind]).format(n=n, group=b.group, k=b.k,
                                                                              gen=json.dumps(gen))
    files["ds_paper12.yaml"] = _GROUP.format(tasks="".join(f"  - ds_{n}\n" for n in B.BENCHMARKS))
    return files


def write_tasks(folder: Path = TASKS_DIR) -> None:
    for name, text in task_yamls().items():
        (folder / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write_tasks()
