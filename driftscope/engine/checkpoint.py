"""A checkpoint as a user names it: an HF folder, a GGUF file, or a PEFT LoRA adapter folder over a base.

`Checkpoint.open(path, flag)` decides which (before any weights load), and every command asks it for the config,
the tokenizer, what identifies its contents (resume fingerprints) and the loaded model. An adapter's model is its
base's with the adapter merged into a copy of the weights (`lora="merge"`), or with low-rank side paths on the
base's own weight tensors (`lora="side"`: J adapters cost one base + J adapters); `auto` merges while a merged copy per
adapter fits in half the memory that is free, else adds side paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from driftscope.engine.config import ModelConfig
from driftscope.engine.model import Transformer
from driftscope.engine.tokenizer import Tokenizer, load_tokenizer
from driftscope.errors import InputError
from driftscope.util import checkpoint_identity, file_digest, read_json, sampled_digest

__all__ = ["Checkpoint", "LORA_MODES", "lora_mode", "FORMS", "load_model", "free_bytes"]

LORA_MODES = ("auto", "merge", "side")
FORMS = "an HF checkpoint folder (config.json + safetensors), a .gguf file or a LoRA adapter folder"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    kind: str  # "hf", "gguf" or "lora"
    flag: str  # how the user named it, for messages: "--base", "--tuned", "--model", "pretrained="
    base: Checkpoint | None = None  # a LoRA adapter's base

    @classmethod
    def open(cls, path: str | Path, flag: str, base: Checkpoint | None = None) -> Checkpoint:
        """What `path` is, checked without reading weights. An adapter's base is `base`, else the local folder or
        file its adapter_config.json names (base_model_name_or_path)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{_named(flag, p)}: no such file or folder; expected {FORMS}")
        if p.is_file():
            if not _is_gguf(p):
                raise InputError(f"{_named(flag, p)} is a file but not a GGUF file; expected {FORMS}")
            return cls(p, "gguf", flag)
        if (p / "adapter_config.json").is_file():
            return cls(p, "lora", flag, base if base is not None else _declared_base(p, flag))
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{_named(flag, p)}: no config.json or adapter_config.json in that folder; "
                                    f"expected {FORMS}")
        return cls(p, "hf", flag)

    @property
    def name(self) -> str:
        """The label of a tuned model: the folder's name, a GGUF file's stem."""
        return self.path.resolve().stem if self.kind == "gguf" else self.path.resolve().name

    def config(self) -> ModelConfig:
        from driftscope.engine import gguf

        if self.kind == "gguf":
            return gguf.read_config(self.path)
        if self.kind == "lora":
            return self.base.config()
        return ModelConfig.from_file(self.path / "config.json")

    def tokenizer_file(self) -> Path | None:
        """The file its own tokenizer comes from (a GGUF holds one; an adapter folder may), None without one."""
        if self.kind == "gguf":
            return self.path
        f = self.path / "tokenizer.json"
        return f if f.is_file() else None

    def tokenizer(self) -> Tokenizer | None:
        """Its own tokenizer, else (an adapter) its base's, else None."""
        if self.tokenizer_file() is not None:
            return load_tokenizer(self.path)
        return self.base.tokenizer() if self.kind == "lora" else None

    def tokenizer_digest(self) -> str | None:
        """sha256 of what its tokenizer is read from (a GGUF's: the file's sampled digest), None without one."""
        f = self.tokenizer_file()
        return None if f is None else (sampled_digest(f) if self.kind == "gguf" else file_digest(f))

    def identity(self) -> dict:
        """What identifies the contents without reading every weight; an adapter's includes its base's."""
        from driftscope.engine import gguf, lora

        if self.kind == "gguf":
            return gguf.identity(self.path)
        if self.kind == "lora":
            return {"adapter": lora.identity(self.path), "base": self.base.identity()}
        return checkpoint_identity(self.path)

    def adapter(self, config: ModelConfig | None = None, *, allow_pickle: bool = False):
        """The validated adapter (lora only: engine.lora.Adapter), checked against its base's config."""
        from driftscope.engine import lora

        assert self.kind == "lora", self
        cfg = config if config is not None else self.base.config()
        return lora.read_adapter(self.path, cfg, str(self.base.path), allow_pickle=allow_pickle)

    def load(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", *,
             allow_pickle: bool = False, stream_layers: bool = False, base_model: Transformer | None = None,
             lora_mode: str = "merge") -> Transformer:
        """The model. An adapter applies to `base_model` (its base, loaded) or, without one, to its base loaded here."""
        from driftscope.engine import lora
        from driftscope.engine.loader import load_model

        if self.kind != "lora":
            return load_model(self.path, device=device, dtype=dtype, allow_pickle=allow_pickle,
                              stream_layers=stream_layers)
        if stream_layers:
            raise InputError(f"{_named(self.flag, self.path)} is a LoRA adapter: it needs its base's layers in memory; "
                             "drop --stream-layers (stream_layers=True)")
        if base_model is None:
            base_model = self.base.load(device, dtype, allow_pickle=allow_pickle)
        adapter = self.adapter(base_model.config, allow_pickle=allow_pickle)
        return (lora.attach if lora_mode == "side" else lora.merged)(base_model, adapter)


def _named(flag: str, path: Path) -> str:
    """How messages name a checkpoint: "--base DIR", "pretrained=DIR"."""
    return f"{flag}{path}" if flag.endswith("=") else f"{flag} {path}"


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _declared_base(adapter_dir: Path, flag: str) -> Checkpoint:
    """The base an adapter names in adapter_config.json, when that is a local checkpoint (a hub id is not)."""
    cfg_file = adapter_dir / "adapter_config.json"
    name = read_json(cfg_file, "adapter config", dict).get("base_model_name_or_path")
    candidates = [Path(name), adapter_dir / name] if isinstance(name, str) and name else []
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise InputError(f"{_named(flag, adapter_dir)} is a LoRA adapter whose base {name!r} ({cfg_file.name}: "
                         "base_model_name_or_path) is not a local checkpoint; give the base (drift: --base; "
                         "Python: base=) or set base_model_name_or_path to the base's folder")
    return Checkpoint.open(found, f"{_named(flag, adapter_dir)}'s base")


def lora_mode(mode: str, adapters: list[Checkpoint], base_bytes: int, device: str | torch.device) -> str:
    """"merge" or "side" for `mode` (one of LORA_MODES) and the adapters that will share one base of `base_bytes`."""
    if mode not in LORA_MODES:
        raise InputError(f"lora={mode!r} (--lora) is not one of {', '.join(LORA_MODES)}")
    if mode != "auto" or not adapters:
        return "merge" if mode == "auto" else mode
    return "merge" if len(adapters) * base_bytes <= free_bytes(device) // 2 else "side"


def free_bytes(device: str | torch.device) -> int:
    """Free memory of `device`: CUDA's mem_get_info, else the host's MemAvailable (0 when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0  # unknown: LoRA side paths, which never need more than the base


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", *,
               allow_pickle: bool = False, stream_layers: bool = False, base: str | Path | Transformer | None = None,
               lora: str = "merge") -> Transformer:
    """Load any checkpoint: an HF folder, a .gguf file, or a LoRA adapter folder applied to `base` (a checkpoint
    path or a loaded Transformer; default: the local base its adapter_config.json names) by `lora` = "merge" (a
    merged copy) or "side" (side paths on the base's own tensors). Never executes code from the checkpoint."""
    base_model = base if isinstance(base, Transformer) else None
    base_ckpt = None if base is None or base_model is not None else Checkpoint.open(base, "base=")
    ckpt = Checkpoint.open(path, "path", base=base_ckpt)
    if ckpt.kind == "lora" and base_model is not None:
        return ckpt.load(device, dtype, allow_pickle=allow_pickle, base_model=base_model, lora_mode=lora)
    return ckpt.load(device, dtype, allow_pickle=allow_pickle, stream_layers=stream_layers, lora_mode=lora)
