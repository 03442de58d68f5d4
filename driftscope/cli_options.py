"""Command-line flags built from an options dataclass: each field's `metadata=cli(help, ...)` says how.

Stdlib only (and driftscope.errors), so the options modules can use it without importing the CLI. A field becomes
`--its-name` (dest: the field name, default: the field's default); bools are `store_true` when they default to False,
else `--x/--no-x`; int, float and str take that type; a tuple is a repeatable flag. Anything else needs a `type=` in
its metadata. A number's range (`cli(..., ge=, gt=, le=)`) is checked by `check_ranges`, for the CLI and the Python
API alike.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import operator
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, fields

from driftscope.errors import InputError

__all__ = ["cli", "add_options", "options_from", "options_doc", "check_ranges", "results", "size", "json_object",
           "as_object", "on_off"]


def cli(help: str, *, flag: str | None = None, group: str | None = None, ge=None, gt=None, le=None,
        cosmetic: bool = False, **argparse_kw) -> dict:
    """A field's metadata: its help text; a number's range (ge: at least, gt: above, le: at most); `cosmetic`: the
    option changes no number of the result (a resumed run may change it; see `results`); and where the defaults don't
    fit the flag name, the argparse group and add_argument keywords (type, choices, action, metavar)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return {"cli": {"help": help, "flag": flag, "group": group, **argparse_kw}, "range": bounds, "cosmetic": cosmetic}


def results(options) -> dict:
    """The fields of the dataclass instance `options` that change results (not `cli(..., cosmetic=True)`, not
    `compare=False`), as JSON-able values: what a resumed run must share with the run it continues."""
    kept = {f.name: getattr(options, f.name) for f in fields(options) if f.compare and not f.metadata.get("cosmetic")}
    return json.loads(json.dumps(kept))


_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le)}


def _expected(bounds: Mapping, integer: bool) -> str:
    return f"{'an integer' if integer else 'a number'} " + " and ".join(f"{_OPS[k][0]} {b}" for k, b in bounds.items())


def _within(v, bounds: Mapping, integer: bool) -> bool:
    return isinstance(v, int if integer else (int, float)) and not isinstance(v, bool) and all(
        _OPS[k][1](v, b) for k, b in bounds.items())  # NaN fails every comparison


def check_ranges(cls: type, values: Mapping) -> None:
    """InputError naming the field, its flag and the value, for the first of `values` (field name -> value) that is
    not a number of its field's type within the field's declared range, or a text not among its choices; None (an
    optional field unset) passes."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        v, choices = values.get(f.name), f.metadata.get("cli", {}).get("choices")
        if isinstance(v, str) and choices and v not in choices:
            raise InputError(f"{f.name}={v!r} is not supported; expected one of {', '.join(choices)} "
                             f"({f.metadata['cli']['flag'] or '--' + f.name.replace('_', '-')})")
        if not (bounds := f.metadata.get("range")) or v is None:
            continue
        integer = int in (hints[f.name], *typing.get_args(hints[f.name]))
        if not _within(v, bounds, integer):
            raise InputError(f"{f.name}={v!r} is invalid: expected {_expected(bounds, integer)} "
                             f"({f.metadata['cli']['flag'] or '--' + f.name.replace('_', '-')})")


def _ranged(parse, bounds: Mapping, integer: bool):
    """An argparse type: `parse`, then the range check (a usage error naming the text)."""
    def ranged(text: str):
        with contextlib.suppress(ValueError, argparse.ArgumentTypeError):
            if _within(v := parse(text), bounds, integer):
                return v
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected {_expected(bounds, integer)}")
    return ranged


def size(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for u, mult in units.items():
        if t.endswith(u):
            t, scale = t[: -len(u)], mult
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GiB, 512MiB, 1e9)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return int(value)


def as_object(value, name: str = "") -> dict:
    """`value` (a mapping, or a JSON object as text) as a dict; InputError naming `name` (e.g. "option=") else."""
    example = '{"enable_thinking": false}'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"{name}{value!r} is not valid JSON ({e.msg} at column {e.colno}); expected a JSON "
                             f"object, e.g. '{example}'") from None
    if not isinstance(value, Mapping):
        raise InputError(f"{name}{value!r} must be a JSON object, e.g. '{example}' (got a {type(value).__name__})")
    return dict(value)


def json_object(text: str) -> dict:
    """A JSON object given on the command line."""
    try:
        return as_object(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def on_off(text: str) -> bool:
    """'on' -> True, 'off' -> False (and true/false, yes/no, 1/0, in any case)."""
    if text.lower() not in ("on", "true", "yes", "1", "off", "false", "no", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")
    return text.lower() in ("on", "true", "yes", "1")


class _AppendTuple(argparse.Action):
    """A repeatable flag collected into a tuple (the dataclass default, e.g. (), is the parsed default as is)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (*getattr(namespace, self.dest), values))


def _default(f: Field):
    return f.default_factory() if f.default is MISSING else f.default


def _inferred(f: Field, hint, default) -> dict:
    """add_argument keywords that follow from the field's type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    tp = args[0] if optional else hint  # X | None parses as X
    if tp is bool:
        return {"action": "store_true" if default is False else argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    if tp is tuple or typing.get_origin(tp) is tuple:
        return {"action": _AppendTuple}
    raise TypeError(f"option {f.name}: no command-line parsing for {hint!r}; give its cli() metadata a type=")


def _group(parser: argparse.ArgumentParser, title: str | None):
    if title is None:
        return parser
    found = [g for g in parser._action_groups if g.title == title]
    return found[0] if found else parser.add_argument_group(title)


def add_options(parser: argparse.ArgumentParser, cls: type, names: Collection[str] | None = None, *,
                parse_ranges: bool = False) -> None:
    """Add a flag for each field of the dataclass `cls` with cli() metadata (only `names` when given); with
    `parse_ranges` a number out of its range is a usage error of the parser (else check_ranges names it)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "cli" not in f.metadata or names is not None and f.name not in names:
            continue  # no cli(): not an option (tests/drift_run/test_cli.py: every DriftOptions field is one)
        meta = dict(f.metadata["cli"])
        flag, group, default = meta.pop("flag"), meta.pop("group"), _default(f)
        if "type" not in meta and "action" not in meta:
            meta.update(_inferred(f, hints[f.name], default))
        if parse_ranges and (bounds := f.metadata.get("range")):
            meta["type"] = _ranged(meta["type"], bounds, int in (hints[f.name], *typing.get_args(hints[f.name])))
        meta["help"] = meta["help"].replace("%", "%%")
        action = _group(parser, group).add_argument(flag or "--" + f.name.replace("_", "-"), dest=f.name,
                                                    default=default, **meta)
        shown = not (default is None or isinstance(default, bool) or default in ((), {}))  # --no-x: True
        if shown and "%(default)" not in action.help:
            action.help += " (default: %(default)s)"


def options_from(args: argparse.Namespace, cls: type, names: Collection[str] | None = None) -> dict:
    """The keyword arguments of `cls` (only `names` when given) from arguments parsed by add_options."""
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if "cli" in f.metadata and (names is None or f.name in names)}


def options_doc(cls: type) -> str:
    """The fields of the options dataclass `cls` as lines to append to a function's docstring (indented 4, as a
    function's docstring is): name=default (--flag): help, one line each."""
    lines = ["", f"    Options ({cls.__name__}; keyword arguments here, the flag on the command line):"]
    for f in (f for f in fields(cls) if "cli" in f.metadata):
        meta = f.metadata["cli"]
        choices = f" (one of: {', '.join(meta['choices'])})" if meta.get("choices") else ""
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        lines.append(f"        {f.name}={_default(f)!r} ({flag}): {meta.get('help', '')}{choices}")
    return "\n".join(lines) + "\n"
