"""`driftscope ti`: the Transferability Index of tuned models against a base from score files. `add_parser(sub)`
registers the subcommand on the main CLI's subparsers; `run(args)` prints Table 1 and, with --out, writes ti.json,
ti.html and ti.png there. Input errors raise ValueError/OSError, which the CLI's boundary prints in one line.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from driftscope.eval.outputs import out_folder
from driftscope.eval.scores import ScoreFile, load_scores
from driftscope.eval.ti import GROUPS, METHODS, transferability_indices
from driftscope.eval.ti_report import format_table, write_json, write_scatter

__all__ = ["add_parser", "run", "parse_sigma", "parse_named_file"]

_PROG = "driftscope ti"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `ti` on the main CLI's subparsers (the object `add_subparsers()` returns); returns the parser."""
    p = subparsers.add_parser(
        "ti", help="Transferability Index (TI_other, TI_non) of tuned models against a base, from score files",
        description="Score files: plain {benchmark: percent} JSON, driftscope scores.json, or lm-eval results JSON.")
    p.add_argument("--base", required=True, metavar="[NAME=]FILE", help="the base model's scores")
    p.add_argument("--tuned", required=True, action="append", metavar="[NAME=]FILE",
                   help="a tuned model's scores (repeatable); NAME defaults to the file's stem")
    p.add_argument("--method", default="relative", choices=METHODS, help="TI definition (default: %(default)s)")
    p.add_argument("--sigma", default=None, metavar="S",
                   help="domain method only: one σ for every group (1.0), one per group "
                        "(math=1,other=1.13556,non=1.27531) or 'pooled' (std of ΔR over the run); default 1")
    p.add_argument("--fraction", action="store_true",
                   help="plain JSON score files hold fractions in [0, 1] (default: percent in [0, 100])")
    p.add_argument("--out", default=None, metavar="DIR", help="also write ti.json, ti.html and ti.png into DIR")
    p.set_defaults(func=run)
    return p


def parse_sigma(text: str | None) -> float | dict[str, float] | str | None:
    """--sigma: None, "pooled", a number, or "group=number,..." naming every group."""
    if text is None or text.strip() == "pooled":
        return None if text is None else "pooled"
    if "=" not in text:
        return _float(text, "--sigma")
    out: dict[str, float] = {}
    for part in text.split(","):
        group, eq, value = part.partition("=")
        group = group.strip()
        if not eq or group not in GROUPS:
            raise ValueError(f"--sigma: {part.strip()!r} is not GROUP=NUMBER with GROUP one of {', '.join(GROUPS)}")
        if group in out:
            raise ValueError(f"--sigma: group {group} is given twice")
        out[group] = _float(value, f"--sigma {group}")
    return out


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text.strip()!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}: σ must be a positive finite number, got {text.strip()!r}")
    return value


def parse_named_file(text: str) -> tuple[str, Path]:
    """(name, path) from "NAME=FILE" or "FILE" (name: the file's stem). A whole argument that is an existing file
    is a FILE even when it contains "=" (runs/lr=1e-5.json)."""
    if "=" in text and not Path(text).is_file():
        name, _, file = text.partition("=")
        if not name.strip() or not file:
            raise ValueError(f"{text!r}: expected NAME=FILE or FILE")
        return name.strip(), Path(file)
    return Path(text).stem, Path(text)


def _load(spec: str, fraction: bool) -> tuple[str, ScoreFile]:
    name, path = parse_named_file(spec)
    sf = load_scores(path, fraction=fraction)
    if sf.ignored:
        left = ", ".join(f"{k} ({why})" for k, why in sf.ignored.items())
        n = len(sf.ignored)
        print(f"{_PROG}: note: {path}: ignored {n} entr{'y' if n == 1 else 'ies'}: {left}", file=sys.stderr)
    return name, sf


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        out_folder(args.out)
    sigma = parse_sigma(args.sigma)
    if sigma is not None and args.method != "domain":
        raise ValueError(f"--sigma applies to --method domain only (got --method {args.method})")
    base_name, base = _load(args.base, args.fraction)
    tuned: dict[str, ScoreFile] = {}
    for spec in args.tuned:
        name, sf = _load(spec, args.fraction)
        if name in tuned or name == base_name:
            raise ValueError(f"model name {name!r} is used twice (from {spec!r}); name them with NAME=FILE")
        tuned[name] = sf
    scores = {name: sf.scores for name, sf in tuned.items()}
    results = transferability_indices(base.scores, scores, args.method, sigma)
    print(format_table(base_name, base.scores, scores, results), end="")
    first = next(iter(results.values()))
    if first.sigma is not None:
        print("σ: " + ", ".join(f"{g} {v:.6g}" for g, v in first.sigma.items()) + f" ({first.sigma_source})")
    for name, r in results.items():
        for key in ("ti_other", "ti_non"):
            if key in r.reasons:
                print(f"{name}: {r.reasons[key]}")
    if args.out is not None:
        out = Path(args.out)
        sources = {base_name: str(base.path), **{n: str(sf.path) for n, sf in tuned.items()}}
        files = {"json": write_json(out / "ti.json", base_name, base.scores, scores, results, sources)}
        files.update(write_scatter(out, base_name, base.scores, scores, results))
        for kind in ("json", "html", "png"):
            if kind in files:
                print(f"{kind}: {files[kind]}")
        if "note" in files:
            print(f"{_PROG}: note: {files['note']}", file=sys.stderr)
    return 0
