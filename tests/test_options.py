"""Each user-facing option is declared once: no two option dataclasses declare the same field, and every flag of
drift, generate and eval maps to exactly one field (the ones naming what to run on, like --base, aside)."""
from __future__ import annotations

import argparse
from dataclasses import fields, is_dataclass

import pytest

from driftscope import options
from driftscope.cli import build_parser
from driftscope.drift_run.options import DriftOptions
from driftscope.engine.sampling import Decoding, SamplingParams
from driftscope.eval.run import EvalOptions
from driftscope.responses import GenerateOptions

OPTION_CLASSES = [*(c for c in vars(options).values() if isinstance(c, type) and is_dataclass(c)), Decoding,
                  SamplingParams, DriftOptions, GenerateOptions, EvalOptions]
# the arguments that name what a command runs on (its inputs and outputs), not options
COMMAND_OPTIONS = {"drift": [DriftOptions], "generate": [SamplingParams, GenerateOptions], "eval": [EvalOptions]}
SUBJECTS = {"drift": {"help", "base", "tuned", "data", "out"}, "generate": {"help", "model", "data", "out"},
            "eval": {"help", "model", "responses", "tasks", "benchmark", "out", "data_dir"}}


def _declared(cls: type) -> set[str]:
    """The fields `cls` declares itself (not those it inherits from its parts)."""
    return {f.name for f in fields(cls)} & set(vars(cls).get("__annotations__", {}))


def test_no_two_option_dataclasses_declare_the_same_field():
    seen: dict[str, str] = {}
    twice = []
    for cls in OPTION_CLASSES:
        for name in _declared(cls):
            if name in seen:
                twice.append(f"{name} ({seen[name]} and {cls.__name__})")
            seen[name] = cls.__name__
    assert not twice, "declared twice: " + "; ".join(twice)


def _declaring(name: str) -> list[str]:
    return [c.__name__ for c in OPTION_CLASSES if name in _declared(c)]


@pytest.mark.parametrize("cmd", sorted(SUBJECTS))
def test_every_flag_maps_to_exactly_one_field(cmd):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    flags = {a.dest: a.option_strings for a in sub._actions if a.dest not in SUBJECTS[cmd]}
    unmapped = {d: f for d, f in flags.items() if len(_declaring(d)) != 1}
    assert not unmapped, f"{cmd} flags that map to no field, or to several: {unmapped}"
    options = {f.name for c in COMMAND_OPTIONS[cmd] for f in fields(c) if "cli" in f.metadata}
    assert set(flags) == options, f"{cmd}: options without a flag {options - set(flags)}, flags of no option " \
        f"{set(flags) - options}"
