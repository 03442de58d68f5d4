"""`driftscope eval` (a model through lm-eval, or existing responses) and `driftscope lm-eval` (lm-eval's own CLI
with the `driftscope` model registered and driftscope's tasks on the include path)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from driftscope.cli_options import add_options, options_from
from driftscope.errors import InputError

__all__ = ["add_parser", "run", "run_lm_eval"]

def add_parser(subparsers, with_options: bool = True) -> argparse.ArgumentParser:
    from driftscope.eval.benchmarks import BENCHMARKS

    names = ", ".join(BENCHMARKS)
    p = subparsers.add_parser(
        "eval", help="score a model on the paper's benchmarks (lm-eval on the engine), or grade existing responses",
        description=f"Benchmarks: {names}. With --model: generation and log-likelihood through lm-eval; with "
                    "--responses: grade a file of {input, output} records (no model).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint: an HF folder (config.json + safetensors + tokenizer), a .gguf "
                     "file, or a LoRA adapter folder whose adapter_config.json names a local base")
    src.add_argument("--responses", help="JSONL of responses to grade, in the benchmark's order or with an id field")
    p.add_argument("--tasks", default=None, help=f"comma-separated benchmarks for --model ({names}), or 'all': "
                   "those whose data is in --data-dir (one line names the others)")
    p.add_argument("--benchmark", default=None, help="the benchmark the --responses belong to")
    p.add_argument("--out", required=True, help="output folder (scores.json, samples/, lm_eval/)")
    p.add_argument("--data-dir", default=None, help="folder with the benchmark files (like ../shared/data/benchmarks); "
                   "default: the Hugging Face datasets (online)")
    if with_options:  # EvalOptions' module imports torch: only when eval is the command
        from driftscope.eval.run import EvalOptions

        add_options(p, EvalOptions, parse_ranges=True)  # a number out of range: a usage error, as argparse's
    p.set_defaults(func=run, interrupted="interrupted; rerun the same command to continue (state in {out})")
    return p


def _tasks(text: str, data_dir: str | None) -> list[str]:
    """--tasks: the names given, or for 'all' every benchmark whose data is there (one line names those skipped)."""
    from driftscope.eval.benchmarks import BENCHMARKS, missing_data

    if text.strip() != "all":
        return [t.strip() for t in text.split(",") if t.strip()]
    skipped = {name: why for name in BENCHMARKS if (why := missing_data(name, data_dir))}
    if len(skipped) == len(BENCHMARKS):
        raise InputError(f"--tasks all: no benchmark's data is in --data-dir {data_dir} (e.g. {skipped['math500']})")
    if skipped and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 says it
        print("driftscope eval: note: --tasks all skips " + "; ".join(f"{n} ({why})" for n, why in skipped.items()),
              file=sys.stderr)
    return [name for name in BENCHMARKS if name not in skipped]


def run(args: argparse.Namespace) -> int:
    from driftscope.eval.outputs import out_folder

    out_folder(args.out)
    if args.responses is not None:
        if not args.benchmark:
            raise InputError("--responses needs --benchmark NAME")
        from driftscope.eval.grade_responses import grade_responses

        result = grade_responses(args.benchmark, args.responses, args.out, data_dir=args.data_dir)
    else:
        if not args.tasks:
            raise InputError("--model needs --tasks (comma-separated benchmarks, or 'all')")
        from driftscope.engine.checkpoint import Checkpoint

        Checkpoint.open(args.model, "--model")
        names = _tasks(args.tasks, args.data_dir)
        from driftscope.eval.run import EvalOptions, evaluate

        result = evaluate(args.model, names, args.out, options=EvalOptions(**options_from(args, EvalOptions)),
                          data_dir=args.data_dir)
        if result.get("rank", 0) != 0:  # under torchrun rank 0 wrote OUT and prints the scores
            return 0
    for name, score in result["scores"].items():
        d = result.get("details", {}).get(name, {})
        shown = "—" if score is None else f"{score:.2f}"
        print(f"{name}: {shown} ({d.get('metric', '')}, {d.get('docs', '?')} docs)")
    print(f"scores: {Path(args.out) / 'scores.json'}")
    return 0


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in lm-eval's arguments (the last one given), else None."""
    found = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(name + "="):
            found = a.split("=", 1)[1]
    return found


def _check_pretrained(argv: list[str]) -> None:
    """`--model driftscope --model_args pretrained=PATH,...`: PATH must be a checkpoint, said before lm-eval starts."""
    args = _flag(argv, "--model_args") or ""
    kv = dict(p.split("=", 1) for p in args.split(",") if "=" in p)
    if _flag(argv, "--model") == "driftscope" and "pretrained" in kv:
        from driftscope.engine.checkpoint import Checkpoint

        Checkpoint.open(kv["pretrained"], "--model_args pretrained=")


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI on `argv` with the driftscope model registered and our tasks included. lm-eval reports its own
    usage errors; an exception raised in the run goes to the caller (the CLI's error boundary)."""
    try:
        import driftscope.eval.lm_model  # noqa: F401  -- registers "driftscope"
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"driftscope lm-eval: error: {exc}; install the eval extra: pip install 'driftscope[eval]'",
              file=sys.stderr)
        return 2
    from driftscope.eval.run import TASKS_DIR

    argv = list(argv)
    _check_pretrained(argv)
    if argv and argv[0] in ("run", "ls", "validate") or not argv or argv[0].startswith("-"):
        if "--include_path" not in argv and (not argv or argv[0] in ("run", "ls", "validate") or "--tasks" in argv):
            argv += ["--include_path", str(TASKS_DIR)]
    if os.environ.get("RANK", "0") != "0":  # under torchrun lm-eval logs on every process: the others only errors
        os.environ.setdefault("LMEVAL_LOG_LEVEL", "ERROR")
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = saved
    return 0
