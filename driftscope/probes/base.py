"""Accumulator contract: `update` per batch, `merge` = exact float64 add, `finalize` -> JSON-able dict.

State is a flat `dict[str, Tensor]` (no pickle) so a run checkpoints with `save_state` (safetensors) and resumes
exactly.
"""
from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from driftscope.util import json_float

__all__ = ["Accumulator", "LayerSums", "field", "save_state", "load_state", "json_float"]


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


class LayerSums:
    """Named float64 tensors per layer, allocated as zeros on the device of the first `get`; merge = add.

    State keys are `{prefix}{name}.{layer}` (CPU copies); layers never touched are absent from the state."""

    def __init__(self, n_layers: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.t: dict[str, list[torch.Tensor | None]] = {k: [None] * int(n_layers) for k in self.shapes}

    def get(self, name: str, layer: int, device: torch.device | str) -> torch.Tensor:
        """The tensor, moved to `device` (kept there) or created there as zeros."""
        v = self.t[name][layer]
        self.t[name][layer] = (torch.zeros(self.shapes[name], dtype=torch.float64, device=device) if v is None
                               else v.to(device))
        return self.t[name][layer]

    def __getitem__(self, name: str) -> list[torch.Tensor | None]:
        return self.t[name]

    def merge(self, other: "LayerSums") -> None:
        for name, per_layer in other.t.items():
            for layer, v in enumerate(per_layer):
                if v is not None:
                    self.get(name, layer, v.device).add_(v)

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{name}.{layer}": v.detach().cpu().clone()
                for name, per_layer in self.t.items() for layer, v in enumerate(per_layer) if v is not None}

    def load(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        for key, v in state.items():
            name, _, layer = key.removeprefix(prefix).rpartition(".")
            if key.startswith(prefix) and name in self.t:
                self.t[name][int(layer)] = v.to(torch.float64).clone()


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
