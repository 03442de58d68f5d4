"""Resumable run state: accumulator states (safetensors) + progress.json, written atomically after batches.

A run killed at any point resumes from its last completed checkpoint and ends with the same outputs; an interrupted
run is never discarded without --overwrite, and a damaged or mismatched state is refused naming the file or value.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from driftscope.distributed import Stateful, processes
from driftscope.errors import InputError
from driftscope.util import atomic_write, read_json, write_json, write_jsonl

STATE_DIR = ".driftscope-state"
_CONTINUE = "the last checkpoint is intact: free space (or make the folder writable), then rerun with --resume"
log = logging.getLogger(__name__)
_ABSENT = object()
_PROGRESS_KEYS = {"fingerprint": dict, "done": dict, "pca_done": list, "generation": int, "gen_done": dict,
                  "gen_rows": dict}


def _differences(old: Any, new: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, saved value, current value) of each leaf where two fingerprints differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*new, *(k for k in old if k not in new)]:
            yield from _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
    elif old != new:
        yield path, old, new


def _show(v: Any) -> str:
    if v is _ABSENT:
        return "absent"
    if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):
        return f"sha256 {v[:12]}…"
    return json.dumps(v, ensure_ascii=False)


def disk_error(exc: OSError, what: str, then: str) -> InputError:
    """One line for a failed write (a full disk, a read-only folder): the file, the reason, and how to go on."""
    return InputError(f"cannot write {what} {exc.filename or ''} ({exc.strerror or exc}); {then}")


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(state, str(path))
    except SafetensorError as exc:  # an I/O failure (a full disk) inside the Rust writer
        raise OSError(errno.EIO, f"safetensors: {exc}", str(path)) from exc


class RunState:
    """progress.json = {"fingerprint": ..., "done": {task: completed batches of this process's share}, "pca_done":
    [tasks], ...}: in `.driftscope-state/` for one process, in `.driftscope-state/rank{r}/` for rank r of a torchrun
    world of K > 1 (its progress.json also holds "world_size": K)."""

    def __init__(self, out: Path, rank: int = 0, world_size: int = 1):
        self.root, self.rank, self.world_size = out / STATE_DIR, rank, world_size
        self.dir = self.root if world_size == 1 else self.root / f"rank{rank}"

    def exists(self) -> bool:
        return (self.dir / "progress.json").is_file()

    def _saved(self) -> list[Path]:
        """The progress files of the interrupted run in this folder: one, or one per rank that saved."""
        top = self.root / "progress.json"
        return [top] if top.is_file() else sorted(self.root.glob("rank*/progress.json"))

    def saved_world(self) -> int | None:
        """How many processes ran the interrupted run in this folder (None: there is none)."""
        files = self._saved()
        if not files or files[0].parent == self.root:
            return len(files) or None
        try:
            n = read_json(files[0], "resume state", dict).get("world_size")
        except ValueError as exc:
            raise self._damaged(files[0], str(exc).removeprefix(str(files[0])).lstrip(": ")) from exc
        if not isinstance(n, int) or n < 2:
            raise self._damaged(files[0], f"world_size {n!r} is not a number of processes")
        return n

    def reset(self, barrier: Callable[[], None]) -> None:
        """Clear the folder's state (every rank's: each rank clears, so node-local folders are cleared too), then,
        once every process has, make this process's folder."""
        shutil.rmtree(self.root, ignore_errors=True)
        barrier()
        self.dir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        """How far the saved run got, e.g. "12 batches of mixed done, saved 2025-01-02 03:04"."""
        files = self._saved()
        when = _dt.datetime.fromtimestamp(max(f.stat().st_mtime for f in files)).strftime("%Y-%m-%d %H:%M")
        done: dict[str, int] = {}
        world = None
        try:
            for f in files:
                prog = read_json(f, "resume state", dict)
                world = prog.get("world_size", world)
                for t, n in [*prog.get("done", {}).items(), *prog.get("gen_done", {}).items()]:
                    done[t] = done.get(t, 0) + n
            gen = prog.get("gen_done", {})
            parts = [f"{n} {'chunks' if t in gen else 'batches'} of {t}" for t, n in done.items()]
        except (ValueError, AttributeError):
            parts = ["progress.json unreadable"]
        by = f" by {world} processes" if isinstance(world, int) and world > 1 else ""
        return f"{', '.join(parts) or 'nothing'} done{by}, saved {when}"

    def begin(self, fresh: dict, *, resume: bool, overwrite: bool, barrier: Callable[[], None] = lambda: None) -> dict:
        """The progress to start from: the saved one with `resume`, else `fresh`, written to a new state (nothing
        saved yet: generation 0) so that resume can check the fingerprint. An interrupted run is never discarded
        without `overwrite`, nor resumed by another number of processes. Under torchrun every rank calls this with
        `barrier` (the world's): no rank clears the folder before every rank has looked at it."""
        if resume and overwrite:
            raise InputError("--resume and --overwrite exclude each other: --resume continues the interrupted run "
                             f"in {self.root.parent}, --overwrite discards it")
        found = bool(self._saved())
        if found and resume:
            if (saved := self.saved_world()) != self.world_size:
                raise InputError(f"cannot resume {self.root.parent}: the interrupted run ran as {processes(saved)}, "
                                 f"this run as {processes(self.world_size)}; resume it with {saved} process"
                                 f"{'es' * (saved > 1)}, or pass --overwrite to start over")
            if self.exists():
                return self.load_progress(fresh["fingerprint"])
            log.warning("--resume: rank %d saved nothing before the interrupt; its share starts over", self.rank)
        elif found and not overwrite:
            raise InputError(f"{self.root.parent} holds an interrupted run ({self.describe()}): pass --resume to "
                             "continue it, or --overwrite to discard it and start over")
        elif resume:
            log.warning("--resume: %s holds no interrupted run to continue; starting a fresh run", self.root.parent)
        try:
            if not (found and resume):
                barrier()  # every process has looked at the folder
                self.reset(barrier)
            else:
                self.dir.mkdir(parents=True, exist_ok=True)
            write_json(self.dir / "progress.json", fresh)
        except OSError as exc:
            raise disk_error(exc, "the resumable state", "free space or make the folder writable, then rerun") from exc
        return fresh

    def _damaged(self, file: Path, detail: str) -> InputError:
        return InputError(f"cannot resume: {file} is damaged ({detail}); pass --overwrite to discard the "
                          "interrupted run and start over")

    def load_progress(self, fingerprint: dict) -> dict:
        path = self.dir / "progress.json"
        try:
            prog = read_json(path, "resume state", dict)
        except ValueError as exc:
            raise self._damaged(path, str(exc).removeprefix(str(path)).lstrip(": ")) from exc
        old = prog.get("fingerprint")
        if not isinstance(old, dict):
            raise self._damaged(path, "no fingerprint object")
        if old != fingerprint:
            diff = list(_differences(old, fingerprint))
            keys = list(dict.fromkeys(p.split(".")[0] for p, _, _ in diff))
            shown = "; ".join(f"{p}: saved {_show(a)}, now {_show(b)}" for p, a, b in diff[:6])
            more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise InputError(
                f"cannot resume {self.dir}: the run's {', '.join(keys)} differ from the interrupted run's ({shown}"
                f"{more}); use the original inputs and options, or pass --overwrite to start over"
            )
        for key, kind in _PROGRESS_KEYS.items():
            if not isinstance(prog.get(key), kind):
                raise self._damaged(path, f"{key!r} is not a JSON {kind.__name__}")
        return prog

    def save(self, progress: dict, accumulators: Mapping[str, Stateful]) -> None:
        """Write every accumulator, then progress.json last: a crash in between leaves the old progress valid."""
        self.dir.mkdir(parents=True, exist_ok=True)
        gen = progress.get("generation", 0) + 1
        for key, acc in accumulators.items():
            state = {k: v.contiguous() for k, v in acc.state_dict().items()}
            atomic_write(self.dir / f"{key}.{gen}.safetensors", lambda p, s=state: _save_tensors(s, p))
        progress["generation"] = gen
        write_json(self.dir / "progress.json", progress)
        for f in self.dir.glob("*.safetensors"):  # drop the previous generation
            if not f.name.endswith(f".{gen}.safetensors"):
                f.unlink()

    def restore(self, progress: dict, accumulators: Mapping[str, Stateful]) -> None:
        gen = progress["generation"]
        if gen == 0:  # nothing was saved yet: fresh accumulators are the state
            return
        missing = [k for k in accumulators if not (self.dir / f"{k}.{gen}.safetensors").is_file()]
        if missing:  # every save writes every accumulator: a gap means the state was damaged, never resume on it
            raise self._damaged(self.dir, f"generation {gen} lacks the state of {', '.join(missing)}")
        for key, acc in accumulators.items():
            path = self.dir / f"{key}.{gen}.safetensors"
            try:
                acc.load_state_dict(load_file(str(path)))
            except (SafetensorError, RuntimeError, OSError, ValueError, KeyError, IndexError) as exc:
                raise self._damaged(path, f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc

    # generate mode: the responses of finished chunks, appended before progress.json counts them
    def append_rows(self, key: str, rows: list[dict]) -> None:
        try:
            with open(self.dir / f"gen.{key}.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        except OSError as exc:
            exc.filename = exc.filename or str(self.dir / f"gen.{key}.jsonl")
            raise disk_error(exc, "the resumable state", _CONTINUE) from exc

    def load_rows(self, key: str, n: int) -> list[dict]:
        """The first n rows (what progress.json counts); the file is cut back to them, dropping rows of a chunk
        finished after the last checkpoint (it is generated again)."""
        path = self.dir / f"gen.{key}.jsonl"
        lines = path.read_text(encoding="utf-8").split("\n") if path.is_file() else []
        if len([x for x in lines if x.strip()]) < n:
            raise self._damaged(path, f"fewer than the {n} responses progress.json counts")
        try:
            rows = [json.loads(x) for x in lines[:n]]
        except json.JSONDecodeError as exc:
            raise self._damaged(path, f"line {exc.lineno}: {exc.msg}") from exc
        write_jsonl(path, rows)
        return rows

    def remove(self) -> None:
        """Drop the state: rank 0 (or the one process) all of it, another rank its own folder."""
        shutil.rmtree(self.root if self.rank == 0 else self.dir, ignore_errors=True)


class Checkpointer:
    """Saves `states` with the progress at most every `every` seconds, stretched so that saving takes at most
    ~10% of the time (a d=5120 streaming-PCA state is GBs); every=0 saves after every call. No-op without a state."""

    def __init__(self, state: RunState | None, states: Mapping[str, Stateful], every: float, times=None) -> None:
        self.state, self.states, self.every = state, states, every
        self.last, self.cost, self.pending = time.monotonic(), 0.0, False
        self.times = times or (lambda name: contextlib.nullcontext())  # an analysis.env.StageTimes

    def save(self, progress: dict) -> None:
        if self.state is not None:
            t = time.monotonic()
            try:
                with self.times("checkpoint"):
                    self.state.save(progress, self.states)
            except OSError as exc:  # the previous checkpoint is intact: save() writes progress.json last
                raise disk_error(exc, "the resumable state", _CONTINUE) from exc
            self.last = time.monotonic()
            self.cost = self.last - t
        self.pending = False

    def maybe_save(self, progress: dict, final: bool = False) -> None:
        """After a unit of work. `final`: the run's last one: not saved now (drift() saves a finished run's state only
        if its summary or outputs fail; a successful run deletes it)."""
        gap = max(self.every, 9 * self.cost) if self.every > 0 else 0.0
        self.pending = True
        if not final and time.monotonic() - self.last >= gap:
            self.save(progress)

    def flush(self, progress: dict) -> None:
        """Save the progress not saved yet: the finished run's state outlives a failure to write its outputs."""
        if self.pending:
            self.save(progress)
