"""The benchmark's weights: SmolLM2-135M-Instruct (tests/real's pinned GGUF and its float32 HF checkpoint) and J
tuned variants of it: copies with 1% Gaussian noise per tensor (w + 0.01·std(w)·ε, ε ~ N(0, 1), seeded by j),
plus F32 GGUFs of any of them for llama.cpp (tests/engine/gguf_writer.py, llama.cpp's own conversion rules).

    python -m bench.peers.weights [J]     # build (cached) and print the paths

Everything is cached beside tests/real's cache (`$DRIFTSCOPE_CACHE/real/`, default ~/.cache/driftscope/real/).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "real"), str(REPO / "tests" / "engine")]  # the real tier's cache, by import
import conftest as real  # noqa: E402  (tests/real/conftest.py)

NOISE = 0.01


def base_gguf() -> Path:
    """The pinned Q4_1 GGUF (downloaded once, sha256 checked every call)."""
    return real.fetch(real.cache_root(), real.SMOLLM2)


def base_hf() -> Path:
    """The float32 HF checkpoint transformers makes of the GGUF (tests/real's `smollm2_hf`)."""
    return real.smollm2_hf.__wrapped__(base_gguf())


def lora() -> Path:
    """tests/real's PEFT LoRA adapter of base_hf() (trained on real MATH500 responses)."""
    return real.smollm2_lora.__wrapped__(base_hf(), REPO.parent / "shared" / "data")


def tuned_hf(j: int, noise: float = NOISE) -> Path:
    """The j-th tuned variant: every tensor of base_hf() plus noise·std(tensor)·N(0, 1), a generator seeded with j
    walking the tensors in name order; config and tokenizer files copied."""
    from safetensors.torch import load_file, save_file

    base = base_hf()

    def build(tmp: Path) -> None:
        g = torch.Generator().manual_seed(j)
        sd = load_file(str(base / "model.safetensors"))
        out = {}
        for name in sorted(sd):
            w = sd[name].float()
            out[name] = (w + noise * w.std() * torch.randn(w.shape, generator=g)).contiguous()
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy(f, tmp / f.name)
        (tmp / "noise.json").write_text(json.dumps({"base": str(base), "noise": noise, "seed": j}))

    return real._atomic_dir(base.parent / f"peers-{base.name}-noise{noise:g}-seed{j}", build)


def gguf_f32(folder: Path) -> Path:
    """`<folder>.f32.gguf`: the HF checkpoint as an all-F32 GGUF (SmolLM2's pre-tokenizer 'smollm')."""
    import gguf_writer  # tests/engine/gguf_writer.py

    out = folder.with_name(folder.name + ".f32.gguf")
    if not out.is_file():
        part = out.with_name(out.name + ".part")
        gguf_writer.write_gguf(folder, part, gguf_writer.Q.F32, pre="smollm")
        part.rename(out)
    return out


def pair(j: int) -> dict:
    """Every path the workloads use: base and j tuned HF folders, with their F32 GGUFs."""
    tuned = [tuned_hf(i) for i in range(1, j + 1)]
    return {"base": base_hf(), "tuned": tuned, "base_gguf": gguf_f32(base_hf()),
            "tuned_gguf": [gguf_f32(t) for t in tuned]}


if __name__ == "__main__":
    paths = pair(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
    print(json.dumps({k: [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in paths.items()}, indent=2))
