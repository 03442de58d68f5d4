"""Command-line entry point `driftscope`: argparse wiring only."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="driftscope")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("backends", help="print which kernel backends are available and why")
    args = parser.parse_args(argv)
    if args.cmd == "backends":
        import json

        from driftscope.kernels import backend_status

        print(json.dumps(backend_status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
