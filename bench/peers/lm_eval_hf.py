"""lm-eval's own `hf` backend (transformers, float32, padded batches) on driftscope's ds_* log-likelihood tasks,
chat template applied, as `driftscope eval` runs them; writes each task's samples (doc_id, arguments, resps, acc)
to OUT/<benchmark>.jsonl for the per-doc comparison.

    python -m bench.peers.lm_eval_hf MODEL DATA_DIR LIMIT OUT BENCHMARK [BENCHMARK ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "driftscope" / "eval" / "tasks"  # driftscope's ds_* task YAMLs, read by lm-eval itself
BATCH = 16


def main(model: str, data_dir: str, limit: int, out: Path, benchmarks: list[str]) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": data_dir})
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32",
                                  tasks=[f"ds_{b}" for b in benchmarks], limit=limit, log_samples=True, device="cpu",
                                  batch_size=BATCH, task_manager=manager, apply_chat_template=True)
    out.mkdir(parents=True, exist_ok=True)
    for b in benchmarks:
        rows = [{"doc_id": s["doc_id"], "arguments": [list(a) for a in s["arguments"]],
                 "resps": [[list(r[0])] for r in s["resps"]], "acc": s["acc"]} for s in res["samples"][f"ds_{b}"]]
        (out / f"{b}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(json.dumps({b: res["results"][f"ds_{b}"].get("acc,none") for b in benchmarks}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:])
