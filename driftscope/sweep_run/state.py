"""What a sweep keeps in OUT between runs: sweep-state.json (the fingerprint of what every result depends on, and the
passes with their labels, assigned once) and checkpoints/<label>.json (a finished checkpoint's entry), all written
atomically, so a sweep killed anywhere resumes: finished checkpoints are read back, a pass resumes by drift's own state.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

from driftscope.errors import InputError
from driftscope.util import read_json, write_json

STATE_FILE = "sweep-state.json"
FORMAT = 1
_PASS_ID = re.compile(r"[0-9a-f]{12}")


def _differences(old, new, path: str = ""):
    """(dotted path, saved, now) where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*new, *(k for k in old if k not in new)]:
            yield from _differences(old.get(k), new.get(k), f"{path}.{k}" if path else k)
    elif old != new:
        yield path, old, new


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


class SweepState:
    """sweep-state.json = {"format", "fingerprint", "passes": [{"id", "labels", "seconds"}]}."""

    def __init__(self, out: Path):
        self.out = out
        self.file = out / STATE_FILE
        self.passes: list[dict] = []

    def begin(self, fingerprint: dict, overwrite: bool) -> None:
        """Start, or continue the sweep saved in OUT: refused, naming what differs, when it was made with other
        inputs or options that change results (unless `overwrite`, which discards it)."""
        if overwrite:
            self._clear()
        if not self.file.is_file():
            if self._leftovers():
                raise InputError(f"{self.out} holds sweep results ({', '.join(self._leftovers())}) but no "
                                 f"{STATE_FILE}: pass --overwrite to discard them, or choose another output folder")
            self.fingerprint = fingerprint
            return
        saved = read_json(self.file, "sweep state", dict)
        if saved.get("format") != FORMAT or not isinstance(saved.get("passes"), list):
            raise InputError(f"{self.file}: not a sweep state of format {FORMAT}; pass --overwrite to start over")
        diff = list(_differences(saved.get("fingerprint"), fingerprint))
        if diff:
            shown = "; ".join(f"{p}: saved {_short(a)}, now {_short(b)}" for p, a, b in diff[:4])
            raise InputError(f"{self.out} holds a sweep made with other inputs or options ({shown}"
                             f"{f'; and {len(diff) - 4} more' if len(diff) > 4 else ''}); use the original ones, "
                             "or pass --overwrite to start over")
        self.fingerprint, self.passes = fingerprint, saved["passes"]

    def _leftovers(self) -> list[str]:
        """The sweep's own files in OUT: checkpoints/*.json, passes/<12 hex digits>/, sweep.json."""
        found = [f"checkpoints/{f.name}" for f in sorted((self.out / "checkpoints").glob("*.json"))]
        found += [f"passes/{d.name}" for d in sorted((self.out / "passes").glob("*")) if _PASS_ID.fullmatch(d.name)]
        return found + ["sweep.json"] * (self.out / "sweep.json").is_file()

    def _clear(self) -> None:
        """Remove the sweep's own files (nothing else in OUT), the state file last: a sweep killed while clearing is
        still refused until --overwrite finishes."""
        for name in self._leftovers():
            p = self.out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        for d in ("checkpoints", "passes"):
            with contextlib.suppress(OSError):
                (self.out / d).rmdir()  # only when empty
        self.file.unlink(missing_ok=True)

    def save(self) -> None:
        write_json(self.file, {"format": FORMAT, "fingerprint": self.fingerprint, "passes": self.passes})

    def entry_file(self, label: str) -> Path:
        return self.out / "checkpoints" / f"{label}.json"

    def entry(self, label: str, identity: dict) -> dict | None:
        """The finished entry of `label`, None when not finished; refused when its checkpoint changed since."""
        f = self.entry_file(label)
        if not f.is_file():
            return None
        e = read_json(f, "sweep checkpoint entry", dict)
        if e.get("identity") != identity:
            what = next((p for p, _, _ in _differences(e.get("identity"), identity)), "contents")
            raise InputError(f"checkpoint {label!r} ({e.get('path')}) changed since {f} was computed ({what}); give "
                             "the new one another label, or pass --overwrite to start over")
        return e

    def put_entry(self, label: str, entry: dict) -> None:
        write_json(self.entry_file(label), entry)
