"""lm-eval's own tasks for the benchmarks it ships, run offline on local files (`driftscope eval --upstream`).

For ifeval, mc_taco, headqa_en, hendrycks_math500, aime25, gpqa_diamond_cot_zeroshot and the seven acp_*_mcq tasks,
the upstream YAML is loaded with lm-eval's own loader (includes and `!function`s resolved) and only the data source
is overridden: `dataset_path: json|csv` with `data_files` pointing into the data folder. Prompts, filters and metrics
stay lm-eval's, so these scores are comparable with anyone's lm-eval run of the same task; the ds_* tasks are the
paper's protocol instead (its prompts, k samples, math-verify). An inline config cannot `include:` in lm-eval 0.4.13,
and data_files need absolute paths known only at run time, which is why this is built in code, not shipped as YAML.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from driftscope.eval.benchmarks import ACP_TASKS, get

__all__ = ["UPSTREAM", "upstream_configs"]

# benchmark -> [(upstream YAML under lm_eval/tasks, split name, data file under the data folder, loader)]
UPSTREAM: dict[str, list[tuple[str, str, str, str]]] = {
    "ifeval": [("ifeval/ifeval.yaml", "train", "ifeval_input_data.jsonl", "json")],
    "mctaco": [("mc_taco/default.yaml", "test", "mctaco_test.jsonl", "json")],
    "headqa": [("headqa/headqa_en.yaml", "test", "headqa_en_test.jsonl", "json")],
    "math500": [("hendrycks_math/hendrycks_math500.yaml", "test", "math500.jsonl", "json")],
    "aime25": [("aime/aime25.yaml", "test", "aime25.jsonl", "json")],
    "gpqa_diamond": [("gpqa/cot_zeroshot/gpqa_diamond_cot_zeroshot.yaml", "train", "gpqa_diamond.csv", "csv")],
    "acpbench": [(f"acpbench/mcq_cot_2shot/{t}.yaml", "test", f"acpbench/{t}.json", "json") for t in ACP_TASKS],
}


def _tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def upstream_configs(benchmark: str, data_dir: str | Path) -> list[dict[str, Any]]:
    """lm-eval task configs (dicts for TaskManager.load / simple_evaluate) reading the benchmark's local files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    name = get(benchmark).name
    if name not in UPSTREAM:
        raise ValueError(f"{name} has no upstream lm-eval task that runs on local files; those that do: "
                         f"{', '.join(UPSTREAM)} (use the ds_{name} task instead)")
    if name == "ifeval":  # lm-eval's ifeval module downloads punkt_tab at import unless it is already there
        from driftscope.eval.graders.ifeval import ensure_punkt_tab

        ensure_punkt_tab()
    root, out = _tasks_root(), []
    for rel, split, file, loader in UPSTREAM[name]:
        data = Path(data_dir) / file
        if not data.is_file():
            raise FileNotFoundError(f"{name}: {data} not found (lm-eval's {Path(rel).stem} reads {file})")
        cfg = load_yaml(root / rel)
        for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            if cfg.get(key) is not None:
                cfg[key] = split  # the local file is the only split
        if cfg.get("test_split") is None and cfg.get("validation_split") is None:
            cfg["test_split"] = split
        cfg.update(dataset_path=loader, dataset_name=None,
                   dataset_kwargs={"data_files": {split: str(data.resolve())}})
        cfg.pop("tag", None)  # tags would pull every sibling task in
        out.append(cfg)
    return out
