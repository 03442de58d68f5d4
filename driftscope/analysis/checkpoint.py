"""Resumable run state: accumulator states (safetensors) + progress.json, written atomically after batches.

A run killed at any point resumes from its last completed checkpoint and ends with the same outputs.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from driftscope.util import atomic_write, read_json, write_json, write_jsonl

STATE_DIR = ".driftscope-state"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


class RunState:
    """progress.json = {"fingerprint": ..., "done": {task: completed batches}, "pca_done": [tasks]}."""

    def __init__(self, out: Path):
        self.dir = out / STATE_DIR

    def exists(self) -> bool:
        return (self.dir / "progress.json").is_file()

    def reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def load_progress(self, fingerprint: dict) -> dict:
        prog = read_json(self.dir / "progress.json", "resume state", dict)
        old = prog["fingerprint"]
        if old != fingerprint:
            diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
            raise ValueError(
                f"cannot resume {self.dir}: the run's {', '.join(diff)} differ from the interrupted run's "
                "(start without --resume, or use the original inputs and options)"
            )
        return prog

    def save(self, progress: dict, accumulators: Mapping[str, Stateful]) -> None:
        """Write every accumulator, then progress.json last: a crash in between leaves the old progress valid."""
        self.dir.mkdir(parents=True, exist_ok=True)
        gen = progress.get("generation", 0) + 1
        for key, acc in accumulators.items():
            state = {k: v.contiguous() for k, v in acc.state_dict().items()}
            atomic_write(self.dir / f"{key}.{gen}.safetensors", lambda p, s=state: save_file(s, str(p)))
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
            raise ValueError(f"cannot resume {self.dir}: generation {gen} lacks the state of {', '.join(missing)} "
                             "(damaged state; start without --resume)")
        for key, acc in accumulators.items():
            acc.load_state_dict(load_file(str(self.dir / f"{key}.{gen}.safetensors")))

    # generate mode: the responses of finished chunks, appended before progress.json counts them
    def append_rows(self, key: str, rows: list[dict]) -> None:
        with open(self.dir / f"gen.{key}.jsonl", "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def load_rows(self, key: str, n: int) -> list[dict]:
        """The first n rows (what progress.json counts); the file is cut back to them, dropping rows of a chunk
        finished after the last checkpoint (it is generated again)."""
        path = self.dir / f"gen.{key}.jsonl"
        lines = path.read_text(encoding="utf-8").split("\n") if path.is_file() else []
        if len([x for x in lines if x.strip()]) < n:
            raise ValueError(f"cannot resume {self.dir}: {path.name} has fewer than the {n} responses progress.json "
                             "counts (damaged state; start without --resume)")
        rows = [json.loads(x) for x in lines[:n]]
        write_jsonl(path, rows)
        return rows

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Checkpointer:
    """Saves `states` with the progress at most every `every` seconds, stretched so that saving takes at most
    ~10% of the time (a d=5120 streaming-PCA state is GBs); every=0 saves after every call. No-op without a state."""

    def __init__(self, state: RunState | None, states: Mapping[str, Stateful], every: float, times=None) -> None:
        self.state, self.states, self.every = state, states, every
        self.last, self.cost = time.monotonic(), 0.0
        self.times = times or (lambda name: contextlib.nullcontext())  # an analysis.env.StageTimes

    def save(self, progress: dict) -> None:
        if self.state is not None:
            t = time.monotonic()
            with self.times("checkpoint"):
                self.state.save(progress, self.states)
            self.last = time.monotonic()
            self.cost = self.last - t

    def maybe_save(self, progress: dict) -> None:
        gap = max(self.every, 9 * self.cost) if self.every > 0 else 0.0
        if time.monotonic() - self.last >= gap:
            self.save(progress)
