"""Command-line entry point `driftscope`: argparse wiring only."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import TypeVar

from driftscope.cli_options import add_options, options_from

T = TypeVar("T")


def _cmd_backends(args: argparse.Namespace) -> int:
    from driftscope.kernels import backend_status

    print(json.dumps(backend_status(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from driftscope.demo.run import format_summary, run_demo

    report = run_demo(args.out, seed=args.seed, progress=True)
    print(format_summary(report))
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    print(f"open {report.files['report']} in a browser to see the report")
    return 0


def _guarded(cmd: str, interrupted: str, call: Callable[[], T]) -> tuple[T | None, int]:
    """(call(), 0); an input error prints `driftscope CMD: error: ...` -> (None, 2), Ctrl-C `interrupted` -> 130."""
    try:
        return call(), 0
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return None, 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"driftscope {cmd}: error: {exc}", file=sys.stderr)
        return None, 2


def _cmd_drift(args: argparse.Namespace) -> int:
    import logging

    from driftscope.analysis.options import DriftOptions
    from driftscope.analysis.run import drift

    logging.basicConfig(level=logging.WARNING, format="driftscope: %(message)s")
    report, rc = _guarded("drift", f"interrupted; continue with the same command plus --resume (state in {args.out})",
                          lambda: drift(args.base, args.tuned, args.data, args.out, **options_from(args, DriftOptions)))
    if rc:
        return rc
    for model, m in report.summary["models"].items():
        for task, t in m["tasks"].items():
            print(f"{model} / {task}: {t['tokens']} tokens, {t['samples']} samples, "
                  f"KL(tuned||base) {t['kl_tb']['token_mean']:.5f}, sampled KL {t['sampled_kl']:.5f}, "
                  f"rank shift {t['rank_shift']['token_mean']:.3f}, top-1 agreement {t['top1_agreement']:.1%}")
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0


def _sampling_names() -> list[str]:
    """SamplingParams fields that `generate` takes from DriftOptions' decoding flags (n is its own flag)."""
    from driftscope.analysis.options import DriftOptions
    from driftscope.engine.sampling import SamplingParams

    drift_names = {f.name for f in fields(DriftOptions)}
    return [f.name for f in fields(SamplingParams) if f.name in drift_names]


def _cmd_generate(args: argparse.Namespace) -> int:
    import logging

    from driftscope.analysis.options import DriftOptions
    from driftscope.analysis.responses import GenerateOptions, generate_responses
    from driftscope.engine.sampling import SamplingParams

    def call():
        params = SamplingParams(n=args.n, **options_from(args, DriftOptions, _sampling_names()))
        return generate_responses(args.model, args.data, args.out, params,
                                  GenerateOptions(**options_from(args, GenerateOptions)))

    logging.basicConfig(level=logging.WARNING, format="driftscope: %(message)s")
    report, rc = _guarded("generate", f"interrupted; rerun the same command to continue ({args.out}.partial keeps "
                          "what was done)", call)
    if rc:
        return rc
    st = report.stats
    print(f"{report.records} responses -> {report.out} ({report.resumed} from the interrupted run; "
          f"{st['decode_tokens'] + st['prefill_tokens']} tokens computed in {st['steps']} steps, "
          f"{st['preemptions']} preemptions)")
    if report.problems:
        print(f"{len(report.problems)} records skipped; first: {report.problems[0]}", file=sys.stderr)
    return 0


def _add_drift(sub, with_options: bool) -> None:
    p = sub.add_parser("drift", help="compare a base model with tuned models on records files, in lockstep")
    p.add_argument("--base", required=True, help="base checkpoint folder (config.json + safetensors + tokenizer)")
    p.add_argument("--tuned", required=True, action="append", help="tuned checkpoint folder (repeatable)")
    p.add_argument("--data", required=True, action="append", help="records file: JSONL/JSON/parquet (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    if with_options:
        from driftscope.analysis.options import DriftOptions

        add_options(p, DriftOptions)
    p.set_defaults(func=_cmd_drift)


def _add_generate(sub, with_options: bool) -> None:
    p = sub.add_parser("generate", help="generate responses for a prompts file with continuous batching")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors + tokenizer)")
    p.add_argument("--data", required=True, help="prompts file: JSONL/JSON/parquet records")
    p.add_argument("--out", required=True, help="responses file (JSONL, the paper's {input, output} records)")
    p.add_argument("-n", type=int, default=1, help="samples per prompt (default: %(default)s)")
    if with_options:
        from driftscope.analysis.options import DriftOptions
        from driftscope.analysis.responses import GenerateOptions

        add_options(p, DriftOptions, _sampling_names())
        add_options(p, GenerateOptions)
    p.set_defaults(func=_cmd_generate)


def build_parser(cmd: str | None = None) -> argparse.ArgumentParser:
    """The `driftscope` parser. drift's and generate's flags come from their options dataclasses (whose modules import
    torch); given `cmd`, the subcommand about to run, only that one gets them."""
    parser = argparse.ArgumentParser(prog="driftscope", description="lockstep base-vs-tuned LLM drift probing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("backends", help="print which kernel backends are available and why")
    p.set_defaults(func=_cmd_backends)
    p = sub.add_parser("demo", help="offline demo on a tiny base/tuned pair built on the spot")
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    _add_drift(sub, cmd in (None, "drift"))
    _add_generate(sub, cmd in (None, "generate"))

    from driftscope.eval import eval_cli, ti_cli

    eval_cli.add_parser(sub)
    ti_cli.add_parser(sub)
    sub.add_parser("lm-eval", help="lm-eval's own CLI with the 'driftscope' model registered and driftscope's tasks "
                   "(ds_*) on the include path; every argument goes to lm-eval", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "lm-eval":  # a passthrough: lm-eval parses its own arguments
        from driftscope.eval.eval_cli import run_lm_eval

        return run_lm_eval(argv[1:])
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
