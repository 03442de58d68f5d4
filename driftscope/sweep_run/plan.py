"""Passes of a sweep: groups of tuned checkpoints that fit the device's free memory next to the base, each run as one
drift call (one base forward and one base head per batch for the whole group). Sizes come from the checkpoints'
headers (no weights read); a pass's id is a hash of its labels, assigned once.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from driftscope.engine.checkpoint import Checkpoint, free_bytes
from driftscope.engine.config import ModelConfig
from driftscope.engine.model import Transformer
from driftscope.util import torch_dtype

ACTIVATION_FACTOR = 2  # live copies of a batch's per-layer states, beyond max_batch_tokens x hidden x layers fp32


def _safetensors_numel(path: Path) -> int:
    """Elements of every tensor in a .safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name != "__metadata__":
            k = 1
            for d in t["shape"]:
                k *= d
            total += k
    return total


def _config_numel(config: ModelConfig) -> int:
    return sum(p.numel() for p in Transformer(config, device="meta").parameters())


def weight_bytes(ckpt: Checkpoint, dtype: str, lora: str) -> int:
    """Bytes the checkpoint's weights take in `dtype` once loaded: HF safetensors headers (the config's parameter
    count without them), a GGUF's parameters from its config; an adapter its own tensors, unless merged (lora="merge":
    a copy of the base). `lora` "auto" counts side paths: drift merges only while the copies fit."""
    elem = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    if ckpt.kind == "lora":
        if lora == "merge":
            return weight_bytes(ckpt.base, dtype, lora)
        files = sorted(ckpt.path.glob("*.safetensors"))
        if files:
            return sum(_safetensors_numel(f) for f in files) * elem
        return sum(f.stat().st_size for f in ckpt.path.glob("adapter_model.*"))
    if ckpt.kind == "hf":
        files = sorted(ckpt.path.glob("*.safetensors"))
        if files:
            return sum(_safetensors_numel(f) for f in files) * elem
    return _config_numel(ckpt.config()) * elem


def activation_bytes(config: ModelConfig, max_batch_tokens: int) -> int:
    """The activation margin of one pass: max_batch_tokens x hidden x (layers + 1) x 4 bytes x ACTIVATION_FACTOR."""
    return max_batch_tokens * config.hidden_size * (config.num_layers + 1) * 4 * ACTIVATION_FACTOR


def _same_device(a: str, b: str) -> bool:
    """"cuda" and "cuda:0" are one device (the index defaults to 0, as for a process's first GPU)."""
    da, db = torch.device(a), torch.device(b)
    return da.type == db.type and (da.index or 0) == (db.index or 0)


@dataclass(frozen=True)
class Budget:
    """Bytes free for the tuned checkpoints of one pass, and the cap on their number."""
    bytes: int
    max_group: int


def budget(base: Checkpoint, dtype: str, max_batch_tokens: int, device: str, tuned_device: str | None,
           max_group: int) -> Budget:
    """Free memory of the tuned models' device less the base (when it shares that device) and the activations."""
    where = tuned_device or device
    base_cost = weight_bytes(base, dtype, "merge") if _same_device(where, device) else 0
    return Budget(free_bytes(where) - base_cost - activation_bytes(base.config(), max_batch_tokens), max_group)


def group(labels: Sequence[str], sizes: dict[str, int], b: Budget) -> list[list[str]]:
    """Next-fit groups in the given order: at most b.max_group labels, their sizes within b.bytes (a checkpoint that
    alone exceeds it is a pass of its own)."""
    out: list[list[str]] = []
    used = 0
    for label in labels:
        if out and len(out[-1]) < b.max_group and used + sizes[label] <= b.bytes:
            out[-1].append(label)
            used += sizes[label]
        else:
            out.append([label])
            used = sizes[label]
    return out


def pass_id(labels: Sequence[str]) -> str:
    """A pass's folder name: 12 hex digits of sha256 over its labels, in order."""
    return hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()[:12]
