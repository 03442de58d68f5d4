"""Command-line entry point `driftscope`: argparse wiring only."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_backends(args: argparse.Namespace) -> int:
    from driftscope.kernels import backend_status

    print(json.dumps(backend_status(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from driftscope.demo.run import format_summary, run_demo

    summary = run_demo(args.out, seed=args.seed)
    print(format_summary(summary))
    print(f"summary written to {args.out}/summary.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftscope", description="lockstep base-vs-tuned LLM drift probing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("backends", help="print which kernel backends are available and why")
    p.set_defaults(func=_cmd_backends)
    p = sub.add_parser("demo", help="offline demo on a tiny base/tuned pair built on the spot")
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
