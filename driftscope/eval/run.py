"""`driftscope eval --model DIR --tasks LIST --out DIR`: the paper's benchmarks through lm-eval on the engine.

One lm-eval run per benchmark, in the order given, each written as soon as it ends:
`OUT/lm_eval/<task>.json` (lm-eval's results JSON), `OUT/samples/<benchmark>.jsonl` (lm-eval's per-sample log)
and `OUT/scores.json` (all benchmarks so far, percent). Resumable at two levels: a finished benchmark is skipped
when the run is repeated with the same options (OUT/eval_run.json holds them; other options are refused, naming
the first that differs), and inside a benchmark every finished generation is kept in OUT/generations/<task>.jsonl
and not redone.

IFEval's NLTK data is put in place (offline) before any model is loaded, so a run cannot die at scoring time.

Under torchrun (WORLD_SIZE > 1) every rank runs this with the same arguments: the model joins the process group,
lm-eval deals each benchmark's docs over the ranks (doc i to rank i mod K) and gathers samples and metrics on rank 0,
which alone writes OUT (its samples in doc order, as one process writes them); each rank keeps its generations in
OUT/generations/<task>.rank<r>.jsonl, and a rerun under any world size takes them all.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from driftscope.cli_options import cli, results
from driftscope.eval import benchmarks as B
from driftscope.eval.outputs import write_json, write_jsonl, write_scores
from driftscope.options import LimitOptions, LMOptions
from driftscope.util import read_json

__all__ = ["evaluate", "EvalOptions", "TASKS_DIR", "task_name"]

TASKS_DIR = Path(__file__).with_name("tasks")
log = logging.getLogger("driftscope.eval")


@dataclass
class EvalOptions(LMOptions, LimitOptions):
    """Options of `driftscope eval --model` (the model's, lm-eval's `driftscope` model_args, and the run's); each
    field's cli() metadata makes its flag."""

    max_gen_toks: int | None = field(default=None, metadata=cli(
        "--model: cap on generated tokens (the paper: 32768)", ge=1))
    apply_chat_template: bool = field(default=True, metadata=cli(
        "--model: do not apply the chat template", flag="--no-chat", action="store_false"))
    upstream: bool = field(default=False, metadata=cli(
        "--model: lm-eval's own tasks (ifeval, mc_taco, headqa_en, hendrycks_math500, aime25, "
        "gpqa_diamond_cot_zeroshot, acp_*_mcq) on the local files, not the ds_* tasks"))
    bootstrap_iters: int = field(default=1000, metadata=cli(  # lm-eval's default, 100,000, takes minutes on a CPU
        "lm-eval's bootstrap for the stderr of non-mean metrics (0 skips it)", ge=0, cosmetic=True))


def task_name(benchmark: str) -> str:
    return f"ds_{B.get(benchmark).name}"


def _no_cli_hint(record: logging.LogRecord) -> bool:
    """Drops lm-eval's warning that gen_kwargs "specified through cli" override the task's: --max-gen-toks does."""
    return "specified through cli" not in record.getMessage()


def _env_info_once() -> None:
    """lm-eval's `add_env_info` once per process, copied after (torch's collect_env, ~0.3 s, ran once per benchmark),
    with `transformers_version` from package metadata, not `import transformers` (0.6 s). Same fields; idempotent."""
    import copy
    import importlib.metadata

    import lm_eval.evaluator as ev
    import lm_eval.utils as lu

    if getattr(ev.add_env_info, "driftscope_once", False):
        return
    compute, cache = ev.add_env_info, {}

    def once(storage: dict) -> None:
        if not cache:
            available = lu.is_transformers_available
            lu.is_transformers_available = lambda: False  # add_env_info imports it from lm_eval.utils when called
            try:
                compute(cache)
            finally:
                lu.is_transformers_available = available
            if available():
                cache["transformers_version"] = importlib.metadata.version("transformers")
        storage.update(copy.deepcopy(cache))

    once.driftscope_once = True  # type: ignore[attr-defined]
    ev.add_env_info = once


def _check_options(out: Path, options: dict, write: bool = True) -> None:
    path = out / "eval_run.json"
    if path.is_file():
        old = read_json(path, "eval run state", dict)
        for key in sorted(set(old) | set(options)):
            if key != "benchmarks" and old.get(key) != options.get(key):
                raise ValueError(f"{out} holds an eval run with {key}={old.get(key)!r}, not {options.get(key)!r}; "
                                 "use another --out, or the same options to continue it")
        options = {**options, "benchmarks": list(dict.fromkeys(old.get("benchmarks", []) + options["benchmarks"]))}
    if write:
        write_json(path, options)


def _doc_order(samples: list[dict]) -> list[dict]:
    """lm-eval's samples as one process logs them: per task and filter (in order of first appearance), by doc id.
    Under torchrun rank 0 receives them rank after rank."""
    first: dict = {}
    for s in samples:
        first.setdefault((s["task"], s.get("filter")), len(first))
    return sorted(samples, key=lambda s: (first[s["task"], s.get("filter")], s.get("doc_id", 0)))


def evaluate(model: str | Path, benchmarks: Sequence[str], out: str | Path, options: EvalOptions | None = None, *,
             data_dir: str | Path | None = None, **shortcuts) -> dict[str, Any]:
    """Evaluate one model; returns the scores.json content (under torchrun, on the other ranks: empty scores and
    their `rank`). `options`: an EvalOptions; `shortcuts`: any of its fields by name (e.g. limit=2, max_gen_toks=8,
    thinking=False; chat= for apply_chat_template), replacing it there. `upstream`: lm-eval's own tasks
    (eval.upstream) instead of the ds_* tasks, for the benchmarks lm-eval ships. `dist_timeout`: seconds a rank
    waits in a collective."""
    from driftscope.distributed import World
    from driftscope.eval.lm_model import DriftscopeLM

    if "chat" in shortcuts:
        shortcuts["apply_chat_template"] = shortcuts.pop("chat")
    o = replace(options or EvalOptions(), **shortcuts)
    out, limit = Path(out), o.limit
    world = World.from_env()
    names = [B.get(b).name for b in benchmarks]
    if not names:
        raise ValueError("no benchmarks given; expected some of " + ", ".join(B.BENCHMARKS))
    if "ifeval" in names:
        from driftscope.eval.graders.ifeval import check_ifeval_ready

        try:
            check_ifeval_ready()
        except RuntimeError as e:  # an environment problem the user can fix: one line, before any model loads
            raise ValueError(f"ifeval cannot be graded here: {e}") from None
    for name in names:  # every data file is read before any model is loaded
        docs = B.load_docs(name, data_dir, limit=limit if world.size > 1 else 1)  # all of them only to count
        if world.size > 1 and (n := len(docs)) < world.size:
            raise ValueError(f"{name} has {n} doc{'s' * (n != 1)}{f' (--limit {limit})' if limit else ''} for "
                             f"{world.size} processes: lm-eval deals doc i to process i mod {world.size} and fails "
                             "on a process without any; run fewer processes or more docs")
        if o.upstream:
            from driftscope.eval.upstream import upstream_configs

            if data_dir is None:
                raise ValueError("--upstream runs lm-eval's tasks on local files: pass --data-dir")
            upstream_configs(name, data_dir)
    state = {"model": str(Path(model).resolve()), "data_dir": str(data_dir) if data_dir else None, **results(o),
             "benchmarks": names}
    out.mkdir(parents=True, exist_ok=True)
    _check_options(out, state, write=world.main)
    lm = DriftscopeLM(pretrained=str(model), options=o)  # an EvalOptions is the model's LMOptions too
    try:
        result = _evaluate(lm, names, out, model, data_dir, o)
        lm.world.barrier()  # no rank leaves before rank 0 has written everything
        return result
    finally:
        lm.world.close()
        from driftscope.kernels.scratch import release_scratch

        release_scratch()  # the forward's reused CPU intermediates (kernels/scratch.py): not kept after the call


def _evaluate(lm, names: list[str], out: Path, model, data_dir, o: EvalOptions) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval.evaluator").addFilter(_no_cli_hint)  # once: the same function is not added twice
    _env_info_once()
    metadata = {"data_dir": str(data_dir)} if data_dir else {}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)  # ds_* only: fast
    result: dict[str, Any] = {"scores": {}, "details": {}}
    for name in names:
        if o.upstream:
            from driftscope.eval.upstream import upstream_configs

            tasks: list = upstream_configs(name, data_dir)
            label = f"{name}.upstream"
        else:
            tasks, label = [task_name(name)], task_name(name)
        done = out / "lm_eval" / f"{label}.json"
        if lm.world.broadcast(done.is_file()):  # rank 0's view: every rank skips the same benchmarks
            log.warning("%s: already evaluated in %s; kept", name, done)
            continue
        lm.gen_cache = out / "generations" / f"{label}.jsonl"
        gen_kwargs = f"max_gen_toks={o.max_gen_toks}" if o.max_gen_toks is not None else None
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=o.limit, log_samples=True,
                                      apply_chat_template=o.apply_chat_template, gen_kwargs=gen_kwargs,
                                      random_seed=o.seed, numpy_random_seed=o.seed, torch_random_seed=o.seed,
                                      fewshot_random_seed=o.seed, bootstrap_iters=o.bootstrap_iters)
        if res is None:  # a rank other than 0: lm-eval gathered its samples and metrics there
            continue
        samples = _doc_order([dict(s, task=t) for t, rows in res.pop("samples", {}).items() for s in rows])
        write_jsonl(out / "samples" / f"{name}.jsonl", samples)
        write_json(done, res)
        if o.upstream:  # lm-eval's own metrics: the primary one per benchmark, as `driftscope ti` reads them
            from driftscope.eval.scores import load_scores

            read = load_scores(done)
            score, key = read.scores.get(name), read.sources.get(name)
        else:
            metrics = res["results"][label]
            key = next(k for k in metrics if k.split(",")[0] in ("score", "acc") and "stderr" not in k)
            score = 100.0 * float(metrics[key])
        details = {"metric": B.get(name).metric if not o.upstream else f"lm-eval {key}", "lm_eval_metric": key,
                   "docs": len(samples), "k": B.get(name).k if not o.upstream else 1, "tasks": sorted(res["results"]),
                   "limit": o.limit, "upstream": o.upstream}
        write_scores(out, {"scores": {name: score}, "details": {name: details}}, model=str(model))
        result["scores"][name], result["details"][name] = score, details
    if not lm.world.main:
        return {"scores": {}, "details": {}, "rank": lm.world.rank}
    return read_json(out / "scores.json", "scores file", dict)

