"""Accumulator contract: `update` per batch, `merge` = exact float64 add, `finalize` -> JSON-able dict.

State is a flat `dict[str, Tensor]` (no pickle) so a run checkpoints with `save_state` (safetensors) and resumes exactly.
"""
from __future__ import annotations

import abc
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["Accumulator", "field", "save_state", "load_state", "json_float"]


class Accumulator(abc.ABC):
    """Streaming statistic over batches.

    - `update(...)` folds one batch in (signature is per accumulator);
    - `merge(other)` adds another accumulator of the same configuration in place and returns self;
      all sums are float64 or int64, so merge is an exact add and the result does not depend on
      how the data was split across batches, processes or machines (to float64 rounding, or bitwise
      where the accumulator says so);
    - `finalize()` returns a JSON-serializable dict (floats, ints, lists, str; NaN written as None);
    - `state_dict()` / `load_state_dict(sd)` give a flat `dict[str, Tensor]` on the CPU that fully
      describes the accumulator (configuration included), for checkpoint/resume via safetensors.
    """

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> None: ...

    @abc.abstractmethod
    def merge(self, other: "Accumulator") -> "Accumulator": ...

    @abc.abstractmethod
    def finalize(self) -> dict: ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def _check_mergeable(self, other: "Accumulator") -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")


def field(obj: Any, name: str) -> torch.Tensor:
    """`obj[name]` for mappings, `obj.name` otherwise (duck-typed probe results); ValueError naming the field."""
    if isinstance(obj, Mapping):
        if name not in obj:
            raise ValueError(f"probe result lacks field {name!r} (has {sorted(obj)})")
        value = obj[name]
    elif not hasattr(obj, name):
        raise ValueError(f"probe result of type {type(obj).__name__} lacks field {name!r}")
    else:
        value = getattr(obj, name)
    if value is None:
        raise ValueError(f"probe result field {name!r} is None (was vocab_probe called without targets?)")
    return value


def json_float(x: float) -> float | None:
    """Python float for JSON; NaN/inf become None (strict JSON has no NaN)."""
    x = float(x)
    return x if math.isfinite(x) else None


def save_state(acc: Accumulator, path: str | Path) -> None:
    """Write `acc.state_dict()` to a safetensors file (with the class name in its metadata)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().cpu().contiguous() for k, v in acc.state_dict().items()}
    save_file(sd, str(path), metadata={"accumulator": type(acc).__name__, "keys": json.dumps(sorted(sd))})


def load_state(acc: Accumulator, path: str | Path) -> Accumulator:
    """Load a file written by `save_state` into `acc` (same class required); returns `acc`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        kind = (f.metadata() or {}).get("accumulator")
    if kind != type(acc).__name__:
        raise ValueError(f"{path}: state was saved by {kind!r}, cannot load into {type(acc).__name__}")
    acc.load_state_dict(load_file(str(path)))
    return acc
