"""Peak resident memory of a base + J LoRA adapters, merged (a weight copy each) vs attached (shared base + side paths).

Usage: python bench/lora_memory.py [--dir DIR] [--js 1 2 4]   -> a markdown table on stdout
Writes a random Llama checkpoint big enough that weights dominate (hidden 512, 8 layers, V 32,000, untied, float32)
and PEFT-layout adapters (r=16 on all 7 linear modules, written directly: no peft needed), then measures each
configuration in a fresh process (/proc/self/status): `imports` = VmRSS before the base is loaded (python + torch);
`load peak` = VmHWM after load_model (the safetensors file's mapped pages count while it is read); then the high-water
mark is reset (/proc/self/clear_refs = 5) and `peak` = VmHWM after reading J adapters, building the J models
(engine/lora.merged or attach; an adapter as read is dropped once its model is built) and one 64-token forward through
each. `held` = the storage the J models hold beyond the base's tensors. Expected: attached J·adapter, merged
J·base, over the base row.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1408)
RANK = 16
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_inputs(root: Path, n_adapters: int) -> tuple[Path, list[Path]]:
    """The base checkpoint and `n_adapters` random adapters for it (each written once per folder)."""
    import torch
    from safetensors.torch import save_file

    from driftscope.testing import random_checkpoint

    base = root / "base"
    if not (base / "model.safetensors").is_file():
        random_checkpoint(base, "llama", **SHAPE)
    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}  # (in, out)
    adapters = []
    for j in range(n_adapters):
        d = root / f"adapter{j}"
        adapters.append(d)
        if (d / "adapter_model.safetensors").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(j)
        sd = {}
        for i in range(SHAPE["num_layers"]):
            for n, (fin, fout) in dims.items():
                key = f"base_model.model.model.layers.{i}.{MODULES[n]}.{n}"
                sd[f"{key}.lora_A.weight"] = torch.randn(RANK, fin, generator=g) / fin**0.5
                sd[f"{key}.lora_B.weight"] = 0.01 * torch.randn(fout, RANK, generator=g)
        save_file(sd, str(d / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(MODULES),
               "bias": "none", "base_model_name_or_path": str(base)}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return base, adapters


def _held_mb(base, models) -> float:
    """MiB of tensor storage the models hold beyond the base's: own parameters and side-path factors."""
    seen = {p.untyped_storage().data_ptr() for p in base.parameters()}
    total = 0
    for m in models:
        tensors = list(m.parameters())
        for layer in m.layers:
            for mod in (layer.attn, layer.mlp):
                for f in (mod.lora or {}).values():
                    tensors += [f.a, *f.b]
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total / 2**20


def child(mode: str, base: str, adapters: list[str]) -> None:
    import torch

    from driftscope.engine.loader import load_model
    from driftscope.engine.lora import attach, merged, read_adapter

    torch.set_num_threads(1)
    imports = _status_mb("VmRSS")
    model = load_model(base)
    load_peak = _status_mb("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    build = {"merged": merged, "attached": attach, "base": None}[mode]
    models, nbytes = [model] if build is None else [], []
    for path in adapters:  # the models are kept, the adapters as read are not
        adapter = read_adapter(Path(path), model.config, base)
        nbytes.append(adapter.nbytes)
        models.append(build(model, adapter))
        del adapter
    held = _held_mb(model, models) if build else 0.0
    ids = torch.randint(0, SHAPE["vocab_size"], (64,), generator=torch.Generator().manual_seed(0))
    for m in models:
        m.logits(ids)
    print(json.dumps({"imports_mb": imports, "load_peak_mb": load_peak, "peak_mb": _status_mb("VmHWM"),
                      "held_mb": held, "adapter_mb": sum(nbytes) / 2**20 / max(len(nbytes), 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoint and adapters go (default: a temp dir)")
    p.add_argument("--js", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.child[2:])
    with tempfile.TemporaryDirectory() as tmp:
        root = a.dir or Path(tmp)
        base, adapters = write_inputs(root, max(a.js))
        base_mb = (base / "model.safetensors").stat().st_size / 2**20
        runs = [("base", 0)] + [(mode, j) for j in a.js for mode in ("attached", "merged")]
        ad_mb = sum(f.stat().st_size for f in adapters[0].glob("*.safetensors")) / 2**20
        print(f"base weights {base_mb:.1f} MiB (float32, {SHAPE}); adapter r={RANK} on all 7 modules: {ad_mb:.2f} "
              "MiB\n")
        print("| configuration | J | imports (MiB) | load peak (MiB) | peak after load (MiB) | over the base row (MiB) "
              "| held by the J models (MiB) | expected (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
        base_peak = None
        for mode, j in runs:
            cmd = [sys.executable, __file__, "--child", mode, str(base), *map(str, adapters[:j])]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            base_peak = r["peak_mb"] if base_peak is None else base_peak
            expected = j * (r["adapter_mb"] if mode == "attached" else base_mb)
            print(f"| {mode} | {j} | {r['imports_mb']:.0f} | {r['load_peak_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] - base_peak:.0f} | {r['held_mb']:.1f} | {expected:.1f} |")

if __name__ == "__main__":
    main()
