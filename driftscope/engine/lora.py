"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) on a base Transformer, two ways.

`read_adapter` reads and validates an adapter against a base's config without touching the base's weights; `merged`
returns a copy of the base with PEFT's merge applied (W += (B·A)·scaling, in W's dtype: equal to PEFT's
merge_and_unload checkpoint); `attach` returns a model that shares the base's weight tensors and adds low-rank side
paths (model.LowRank) at the four linear sites, so J adapters cost one base plus J adapters.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from driftscope.engine.config import ModelConfig
from driftscope.engine.loader import STORED_DTYPES, expected_weights
from driftscope.engine.model import LowRank, Transformer
from driftscope.engine.streaming import StreamedLayers
from driftscope.errors import InputError
from driftscope.util import file_digest, read_json, sampled_digest

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# HF module name -> its parent in a decoder layer; where its weight goes (fused rows) is the loader's weight table
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# config fields whose non-default values change the arithmetic in ways this module does not implement
REFUSED = {"use_dora": False, "lora_bias": False, "target_parameters": None, "trainable_token_indices": None,
           "layer_replication": None, "use_qalora": False, "alora_invocation_tokens": None}
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")  # inits that rewrite the base weights
_PREFIX = "base_model.model."


@dataclass
class Factor:
    """One module's LoRA factors: a [r, in], b [out, r] as stored; delta = (b · a) · scaling."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


@dataclass
class Adapter:
    path: Path
    config: dict
    base_name: str | None  # the adapter's base_model_name_or_path
    factors: dict[tuple[int, str], Factor] = field(default_factory=dict)  # (layer, HF module name) -> factors
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: HF weight name -> tensor

    @property
    def nbytes(self) -> int:
        ts = [t for f in self.factors.values() for t in (f.a, f.b)] + list(self.saved.values())
        return sum(t.numel() * t.element_size() for t in ts)


def is_adapter(path: Path) -> bool:
    """A folder holding adapter_config.json."""
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def identity(path: Path) -> dict:
    """Digests of the adapter's config (sha256) and weights (sampled), for resume fingerprints."""
    root = Path(path)
    out = {CONFIG_NAME: file_digest(root / CONFIG_NAME)}
    for name in (WEIGHTS_NAME, PICKLE_NAME):
        if (root / name).is_file():
            out[name] = sampled_digest(root / name)
    return out


def _module_key(i: int, name: str) -> str:
    return f"model.layers.{i}.{MODULES[name]}.{name}"


def _targeted(cfg: dict, key: str) -> bool:
    """PEFT's check_target_module_exists (peft 0.21) for one module key of a Llama-family model."""
    excl = cfg.get("exclude_modules")
    if excl and (re.fullmatch(excl, key) if isinstance(excl, str)
                 else key in excl or any(key.endswith(f".{e}") for e in excl)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in cfg.get("modules_to_save") or ()):
        return False
    tm = cfg.get("target_modules")
    if tm == "all-linear":  # PEFT expands it to every linear layer but the output layer
        return True
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    if not any(key.endswith(f".{t}") for t in tm):
        return False
    idx = cfg.get("layers_to_transform")
    if idx is None or idx == []:
        return True
    pats = cfg.get("layers_pattern")
    pats = [pats] if isinstance(pats, str) else pats
    match = None
    for p in pats or [None]:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\." if not p else rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
        if match:
            break
    if match is None:
        return False
    return int(match["idx"]) == idx if isinstance(idx, int) else int(match["idx"]) in idx


def _pattern(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", key), else `default`."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def _read_config(root: Path) -> dict:
    cfile = root / CONFIG_NAME
    try:
        cfg = read_json(cfile, "adapter config", dict)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{cfile}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    if cfg.get("bias", "none") != "none":
        raise InputError(f"{cfile}: bias={cfg['bias']!r} (trained base biases) is not supported; expected 'none'")
    for k, default in REFUSED.items():
        if cfg.get(k, default) not in (default, [], {}):
            raise InputError(f"{cfile}: {k}={cfg[k]!r} is not supported (plain LoRA only); expected {default!r}")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(RESIDUAL_INITS):  # PEFT saved it against its changed (residual/quantized) base weights
        raise InputError(f"{cfile}: init_lora_weights={cfg['init_lora_weights']!r}: this adapter applies to PEFT's "
                         "modified base, not the original; save it with path_initial_model_for_weight_conversion")
    for k in ("r", "lora_alpha"):
        if not isinstance(cfg.get(k), (int, float)) or isinstance(cfg.get(k), bool) or cfg[k] <= 0:
            raise InputError(f"{cfile}: {k}={cfg.get(k)!r}; expected a positive number")
    tm = cfg.get("target_modules")
    if not (isinstance(tm, str) or (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm))):
        raise InputError(f"{cfile}: target_modules={tm!r}; expected a list of module names or a regex string")
    for k in ("target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern"):
        for pattern in [cfg[k]] if isinstance(cfg.get(k), str) else cfg.get(k) or ():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise InputError(f"{cfile}: {k} holds {pattern!r}, not a regular expression ({exc})") from None
    return cfg


def _targets(cfg: dict, c: ModelConfig, cfile: Path) -> set[tuple[int, str]]:
    """(layer, HF module) pairs the config targets; InputError for target names that match no supported module."""
    everything = [(i, n) for i in range(c.num_layers) for n in MODULES]
    tm, supported = cfg["target_modules"], " ".join(MODULES)
    if isinstance(tm, list):
        unknown = [t for t in tm if not any(_module_key(i, n) == t or _module_key(i, n).endswith(f".{t}")
                                            for i, n in everything)]
        if unknown:
            raise InputError(f"{cfile}: target_modules {unknown} are not supported; supported: {supported}")
    out = {(i, n) for i, n in everything if _targeted(cfg, _module_key(i, n))}
    if not out:
        raise InputError(f"{cfile}: target_modules={tm!r} (layers_to_transform={cfg.get('layers_to_transform')!r}) "
                         f"matches no module of {c.source}; supported: {supported}")
    return out


def _open_weights(root: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    if (root / WEIGHTS_NAME).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return root / WEIGHTS_NAME, load_file(str(root / WEIGHTS_NAME))
        except SafetensorError as exc:
            raise InputError(f"{root / WEIGHTS_NAME}: cannot read safetensors file ({exc})") from None
    if (root / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise InputError(f"{root / PICKLE_NAME}: pickle files can execute code when loaded, so they are refused; "
                             "convert to adapter_model.safetensors or pass --allow-pickle (allow_pickle=True)")
        try:
            sd = torch.load(root / PICKLE_NAME, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError) as exc:
            raise InputError(f"{root / PICKLE_NAME}: cannot load with torch.load(weights_only=True): {exc}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"{root / PICKLE_NAME}: expected a flat dict of tensors")
        return root / PICKLE_NAME, sd
    raise FileNotFoundError(f"{root / WEIGHTS_NAME}: adapter weights not found (nor {PICKLE_NAME})")


def read_adapter(path: Path, config: ModelConfig, base: str, *, allow_pickle: bool = False) -> Adapter:
    """Read and validate the PEFT LoRA adapter folder `path` for a base with `config` (named `base` in messages)."""
    root = Path(path)
    if not is_adapter(root):
        raise FileNotFoundError(f"{root / CONFIG_NAME}: adapter config not found")
    cfg = _read_config(root)
    cfile = root / CONFIG_NAME
    wfile, tensors = _open_weights(root, allow_pickle)
    adapter = Adapter(root, cfg, cfg.get("base_model_name_or_path"))
    made_for = f"the adapter was made for {adapter.base_name!r}, not {base!r}" if adapter.base_name else \
        f"{CONFIG_NAME} names no base_model_name_or_path; is it for {base!r}?"
    targets = _targets(cfg, config, cfile)
    weights = expected_weights(config)
    save = cfg.get("modules_to_save") or ()
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if t.dtype not in STORED_DTYPES.values():
            raise InputError(f"{wfile}: tensor {key!r} is {t.dtype}; supported: {', '.join(STORED_DTYPES)}")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"{wfile}: tensor {key!r} holds {int((~torch.isfinite(t)).sum())} non-finite values")
        name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", key.removeprefix(_PREFIX))
        name = name.replace(".modules_to_save.default.", ".")
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_[AB])\.weight", name)
        if m and m[3] in MODULES and (int(m[1]), m[3]) in targets:
            found.setdefault((int(m[1]), m[3]), {})[m[4]] = t
        elif name in weights and any(re.match(rf"(^|.*\.){s}($|\..*)", name.rsplit(".", 1)[0]) for s in save):
            if tuple(t.shape) != weights[name].shape:
                raise InputError(f"{wfile}: tensor {key!r} has shape {list(t.shape)}, expected "
                                 f"{list(weights[name].shape)} for base {base!r} ({made_for})")
            if config.tie_word_embeddings and name in ("model.embed_tokens.weight", "lm_head.weight"):
                raise InputError(f"{wfile}: tensor {key!r} (modules_to_save) replaces a tied embedding/LM head of "
                                 f"{base!r}; not supported for tied bases")
            adapter.saved[name] = t
        else:
            raise InputError(f"{wfile}: tensor {key!r} matches no module targeted by {cfile.name} "
                             f"(target_modules={cfg['target_modules']!r}, modules_to_save={list(save)!r}) "
                             f"in base {base!r} with {config.num_layers} layers ({made_for})")
    rslora = bool(cfg.get("use_rslora", False))
    for i, n in sorted(targets):
        k = _module_key(i, n)
        got = found.get((i, n), {})
        if set(got) != {"lora_A", "lora_B"}:
            missing = sorted({"lora_A", "lora_B"} - set(got))
            raise InputError(f"{wfile}: tensor {_PREFIX}{k}.{missing[0]}.weight is missing; {cfile.name} targets {k}")
        r = _pattern(cfg.get("rank_pattern") or {}, k, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern") or {}, k, cfg["lora_alpha"])
        fout, fin = weights[f"{k}.weight"].shape
        for ab, want in (("lora_A", (r, fin)), ("lora_B", (fout, r))):
            if tuple(got[ab].shape) != want:
                raise InputError(f"{wfile}: tensor {_PREFIX}{k}.{ab}.weight has shape {list(got[ab].shape)}, expected "
                                 f"{list(want)} (r={r}) for base {base!r}; {made_for}")
        adapter.factors[(i, n)] = Factor(got["lora_A"], got["lora_B"], alpha / math.sqrt(r) if rslora else alpha / r)
    return adapter


def _check_base(base: Transformer) -> None:
    if isinstance(base.layers, StreamedLayers):
        raise InputError("a LoRA adapter needs the base's layers in memory; load the base without --stream-layers "
                         "(stream_layers=False)")


def _rebuild(base: Transformer, tensors: dict[str, torch.Tensor]) -> Transformer:
    """A Transformer of base's config whose parameters ARE `tensors` (no copy), rope state and head copy as base's."""
    model = Transformer(base.config, device="meta", dtype=base.dtype)
    model.load_state_dict(tensors, assign=True, strict=True)
    model._head = base._head
    model.requires_grad_(False)
    return model.eval()


def _apply_saved(model: Transformer, adapter: Adapter, copy_fused: bool) -> None:
    """modules_to_save tensors replace the base's in `model` only (its own copies; fused rows on a copy)."""
    targets = expected_weights(model.config, model)
    params = dict(model.named_parameters())
    done: set[str] = set()
    for name, t in adapter.saved.items():
        tg = targets[name]
        mod_name, attr = tg.param.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        p = params[tg.param]
        if tg.rows is None:
            new = t.to(p.device, p.dtype).clone()
        else:
            new = p.data.clone() if copy_fused and tg.param not in done else p.data
            new[tg.rows[0] : tg.rows[1]] = t.to(p.device, p.dtype)
        setattr(mod, attr, torch.nn.Parameter(new, requires_grad=False))
        params[tg.param] = getattr(mod, attr)
        done.add(tg.param)


def merged(base: Transformer, adapter: Adapter) -> Transformer:
    """A new Transformer: the base's weights plus the adapter's deltas, as PEFT merges (the base is untouched)."""
    _check_base(base)
    model = _rebuild(base, {k: v.clone() for k, v in base.state_dict().items()})
    if base._head is not None:
        model._head = base._head.clone()
    targets, params = expected_weights(model.config, model), dict(model.named_parameters())
    with torch.no_grad():
        for (i, n), f in adapter.factors.items():
            tg = targets[f"{_module_key(i, n)}.weight"]
            w = params[tg.param].data
            r0, r1 = tg.rows or (0, w.shape[0])
            # PEFT holds the factors in float32 (autocast_adapter_dtype; float64 for a float64 base) and adds the delta
            # into W in place
            ft = torch.promote_types(w.dtype, torch.float32)
            w[r0:r1] += (f.b.to(w.device, ft) @ f.a.to(w.device, ft)) * f.scaling
    _apply_saved(model, adapter, copy_fused=False)
    return model


def attach(base: Transformer, adapter: Adapter) -> Transformer:
    """A new Transformer that shares the base's weight tensors and adds the adapter as side paths (model.LowRank)."""
    _check_base(base)
    model = _rebuild(base, base.state_dict())
    dev, dt, targets = base.device, base.dtype, expected_weights(base.config, model)
    sites: dict[str, list[tuple[int, Factor]]] = {}  # fused parameter -> (first row, factors) per part
    for (i, n), f in sorted(adapter.factors.items()):
        tg = targets[f"{_module_key(i, n)}.weight"]
        sites.setdefault(tg.param, []).append((tg.rows[0] if tg.rows else 0, f))
    for param, parts in sites.items():
        fs = [f for _, f in parts]
        a = torch.cat([f.a.to(dev, dt) for f in fs]) if len(fs) > 1 else fs[0].a.to(dev, dt)  # [R, in]
        bs = tuple((f.b.to(dev, torch.float32) * f.scaling).to(dt) for f in fs)  # [out_p, r_p] each
        owner, site, _ = param.rsplit(".", 2)  # "layers.{i}.attn", "wqkv", "weight"
        mod = model.get_submodule(owner)
        if mod.lora is None:
            mod.lora = torch.nn.ModuleDict()
        mod.lora[site] = LowRank(a, bs, [row for row, _ in parts])
    _apply_saved(model, adapter, copy_fused=True)
    return model
