"""A sweep manifest (JSON, or YAML with PyYAML): one base, a series of checkpoints with an ordinal, records files,
drift options by name. `read_manifest` checks all of it, without loading any weights, each error one line naming the
manifest file and the key or value.
"""
from __future__ import annotations

import difflib
import glob
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from driftscope.drift_run.options import DriftOptions
from driftscope.drift_run.plan import plan
from driftscope.engine.checkpoint import Checkpoint
from driftscope.errors import InputError

SWEEP_KEYS = ("base", "checkpoints", "data", "ordinal", "max_group", "eval")
NOT_OPTIONS = ("resume", "overwrite")  # the sweep resumes by itself; --overwrite is the command's, not the manifest's
OPTION_KEYS = tuple(f.name for f in fields(DriftOptions) if f.name not in NOT_OPTIONS)
DEFAULT_MAX_GROUP = 8
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*")  # a label names a file: checkpoints/<label>.json


@dataclass(frozen=True)
class Entry:
    """One checkpoint of the series: its label, path, and ordinal (step, epoch, bits...; None when not given)."""
    label: str
    path: Path
    ordinal: int | float | None


@dataclass
class Manifest:
    source: str  # how messages name the manifest: its path, or "sweep manifest" for a dict
    base: Path
    checkpoints: list[Entry]
    data: list[Path]
    options: dict  # DriftOptions keywords (validated)
    ordinal: str = "step"
    max_group: int = DEFAULT_MAX_GROUP
    scores: dict[str, Path] | None = None  # label (or "base") -> a score file of `driftscope eval`
    file: Path | None = None  # the manifest file (None: given as a dict)

    def drift_options(self, **extra) -> DriftOptions:
        return DriftOptions(**{**self.options, **extra})


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f'did you mean "{close[0]}"?' if close else f"expected one of {', '.join(known)}"


def _load(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"sweep manifest {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{path}: a YAML manifest needs PyYAML: pip install pyyaml (or write it as JSON)") \
                from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None


def _trailing_int(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def _number(src: str, where: str, v) -> int | float | None:
    if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")):
        return v
    raise InputError(f"{src}: {where} = {v!r} is not a number (the ordinal: a step, an epoch, bits...)")


def _listed(src: str, root: Path, pattern: str) -> list[Entry]:
    """A glob, or a training run's folder of checkpoint-* dirs: labels = names, ordinal = the trailing integer."""
    full = root / pattern
    if full.is_dir() and not (full / "config.json").exists() and not (full / "adapter_config.json").exists():
        full = full / "checkpoint-*"
    found = [Path(p) for p in glob.glob(str(full))]
    if not found:
        raise InputError(f"{src}: \"checkpoints\": {pattern!r} matches no checkpoint (a glob, or a folder of "
                         "checkpoint-* dirs)")
    found.sort(key=lambda p: (_trailing_int(p.stem if p.is_file() else p.name) is None,
                              _trailing_int(p.stem if p.is_file() else p.name) or 0, p.name))
    return [Entry(p.stem if p.is_file() else p.name, p, _trailing_int(p.stem if p.is_file() else p.name))
            for p in found]


def _entries(src: str, root: Path, value, ordinal: str) -> list[Entry]:
    if isinstance(value, str):
        return _listed(src, root, value)
    if not isinstance(value, list) or not value:
        raise InputError(f"{src}: \"checkpoints\" must be a non-empty list of {{\"path\", \"label\", \"{ordinal}\"}} "
                         "objects, a glob or a folder of checkpoint-* dirs")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise InputError(f"{src}: checkpoints[{i}] = {item!r} is not an object with a \"path\"")
        for k in item:
            if k not in ("path", "label", ordinal):
                raise InputError(f"{src}: checkpoints[{i}]: unknown key \"{k}\": "
                                 f"{_suggest(k, ('path', 'label', ordinal))} (the ordinal key is \"ordinal\": "
                                 f"\"{ordinal}\")")
        if not isinstance(item.get("path"), str) or not item["path"]:
            raise InputError(f"{src}: checkpoints[{i}] has no \"path\" (a string)")
        path = root / item["path"]
        label = item.get("label", path.stem if path.is_file() else path.name)
        if not isinstance(label, str):
            raise InputError(f"{src}: checkpoints[{i}].label = {label!r} is not a string")
        out.append(Entry(label, path, _number(src, f"checkpoints[{i}].{ordinal}", item.get(ordinal))))
    return out


def _check_entries(src: str, entries: list[Entry], scores: bool) -> None:
    seen: dict[str, Entry] = {}
    paths: dict[Path, str] = {}
    for e in entries:
        if not _LABEL.fullmatch(e.label) or (scores and e.label == "base"):
            raise InputError(f"{src}: checkpoint label {e.label!r} is not usable: letters, digits and ._+=@- "
                             "(not first), and not \"base\" when eval scores are given")
        if e.label in seen:
            raise InputError(f"{src}: duplicate label {e.label!r} ({seen[e.label].path} and {e.path}): give each "
                             "checkpoint its own label")
        seen[e.label] = e
        key = e.path.resolve()
        if key in paths:
            raise InputError(f"{src}: checkpoint {e.path} is listed twice (labels {paths[key]!r} and {e.label!r})")
        paths[key] = e.label


def _eval_scores(src: str, root: Path, value, labels: set[str]) -> dict[str, Path]:
    from driftscope.eval.scores import read_scores

    if not isinstance(value, dict) or set(value) - {"scores"}:
        bad = next(iter(set(value) - {"scores"}), None) if isinstance(value, dict) else None
        raise InputError(f"{src}: \"eval\" must be {{\"scores\": {{LABEL: scores.json, \"base\": scores.json}}}}"
                         + (f"; unknown key \"{bad}\": {_suggest(bad, ('scores',))}" if bad else ""))
    scores = value.get("scores")
    if not isinstance(scores, dict) or "base" not in scores:
        raise InputError(f"{src}: \"eval\".\"scores\" must map checkpoint labels and \"base\" to score files")
    for label in scores:
        if label != "base" and label not in labels:
            raise InputError(f"{src}: eval.scores.{label}: no checkpoint has that label ({_suggest(label, labels)})")
    out = {}
    for label, f in scores.items():
        if not isinstance(f, str):
            raise InputError(f"{src}: eval.scores.{label} = {f!r} is not a path")
        out[label] = root / f
        try:
            read_scores(out[label])
        except (ValueError, OSError) as exc:
            raise InputError(f"{src}: eval.scores.{label}: {exc}") from None
    return out


def _prefixed(src: str, exc: Exception) -> Exception:
    msg = f"{src}: {'; '.join(x.strip() for x in str(exc).splitlines() if x.strip())}"
    return FileNotFoundError(msg) if isinstance(exc, FileNotFoundError) else InputError(msg)


def read_manifest(manifest: str | Path | Mapping, overrides: Mapping | None = None,
                  check_inputs: bool = True) -> Manifest:
    """The checked manifest (a path to JSON/YAML, or the dict itself; relative paths: from the manifest's folder, or
    the working folder for a dict). `overrides` replace top-level keys. With `check_inputs`, every checkpoint is
    opened and drift's plan (tokenizers, configs, adapters, records) runs over all of them: no weights load."""
    if isinstance(manifest, Mapping):
        src, root, raw, path = "sweep manifest", Path("."), dict(manifest), None
    else:
        path = Path(manifest)
        src, root, raw = str(path), path.parent, _load(path)
    if not isinstance(raw, dict):
        raise InputError(f"{src}: the manifest must be an object with \"base\", \"checkpoints\" and \"data\"")
    raw.update(overrides or {})
    known = (*SWEEP_KEYS, *OPTION_KEYS)
    for k in raw:
        if k in NOT_OPTIONS:
            raise InputError(f"{src}: \"{k}\" is not a manifest key: a sweep resumes by itself; to start over pass "
                             "--overwrite (overwrite=True)")
        if k not in known:
            raise InputError(f"{src}: unknown field \"{k}\": {_suggest(k, known)}")
    for k in ("base", "checkpoints", "data"):
        if k not in raw:
            raise InputError(f"{src}: missing key \"{k}\" (a manifest needs \"base\", \"checkpoints\" and \"data\")")
    ordinal = raw.get("ordinal", "step")
    if not isinstance(ordinal, str) or not ordinal.isidentifier() or ordinal in ("path", "label"):
        raise InputError(f"{src}: \"ordinal\" = {ordinal!r} must name the checkpoints' ordinal key (step, epoch, "
                         "bits...)")
    max_group = raw.get("max_group", DEFAULT_MAX_GROUP)
    if not isinstance(max_group, int) or isinstance(max_group, bool) or max_group < 1:
        raise InputError(f"{src}: \"max_group\" = {max_group!r} must be an integer >= 1 (tuned checkpoints per pass)")
    if not isinstance(raw["base"], str) or not raw["base"]:
        raise InputError(f"{src}: \"base\" = {raw['base']!r} must be a path")
    data = [raw["data"]] if isinstance(raw["data"], str) else raw["data"]
    if not isinstance(data, list) or not data or not all(isinstance(d, str) and d for d in data):
        raise InputError(f"{src}: \"data\" = {raw['data']!r} must be a records file path or a list of them")
    for i, d in enumerate(data):
        if not (root / d).is_file():
            raise FileNotFoundError(f"{src}: data[{i}]: records file {root / d} does not exist")
    entries = _entries(src, root, raw["checkpoints"], ordinal)
    _check_entries(src, entries, "eval" in raw)
    options = {k: v for k, v in raw.items() if k in OPTION_KEYS}
    if isinstance(options.get("pca_texts"), str):
        options["pca_texts"] = str(root / options["pca_texts"])
    if isinstance(options.get("tuned_device"), str):
        options["tuned_device"] = (options["tuned_device"],)
    if len(options.get("tuned_device") or ()) > 1:
        raise InputError(f"{src}: \"tuned_device\" must be one device for all checkpoints in a sweep")
    try:
        opts = DriftOptions(**options)
    except (ValueError, TypeError, OSError) as exc:
        raise _prefixed(src, exc) from None
    m = Manifest(src, root / raw["base"], entries, [root / d for d in data], options, ordinal, max_group, file=path)
    if "eval" in raw:
        m.scores = _eval_scores(src, root, raw["eval"], {e.label for e in entries})
    if check_inputs:
        check(m, opts)
    return m


def check(m: Manifest, opts: DriftOptions) -> None:
    """Every checkpoint exists and opens, and drift's plan over all of them passes (no weights load)."""
    try:
        base = Checkpoint.open(m.base, f"{m.source}: \"base\"")
        for e in m.checkpoints:
            Checkpoint.open(e.path, f"{m.source}: checkpoint {e.label!r}", base=base)
        plan(m.base, [e.path for e in m.checkpoints], m.data, opts)
    except (ValueError, OSError) as exc:
        if str(exc).startswith(m.source):
            raise
        raise _prefixed(m.source, exc) from None
