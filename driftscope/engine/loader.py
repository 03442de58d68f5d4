"""load_model(path) -> Transformer: reads an HF checkpoint folder (config.json + safetensors, single or sharded) or a
GGUF file (engine/gguf.py maps its tensors to HF names and layout; the same table and checks apply).

Strict: every expected tensor present once with its exact shape, nothing unexpected, errors name the file and tensor.
Loads tensor by tensor into preallocated (fused) parameters, refusing NaN/Inf; pickle checkpoints only with
allow_pickle=True (--allow-pickle). User-fixable failures are InputError.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from safetensors import SafetensorError, safe_open

from driftscope.engine import gguf
from driftscope.engine.config import ModelConfig
from driftscope.engine.model import Transformer
from driftscope.engine.streaming import LayerTensor, StreamedLayers
from driftscope.errors import InputError
from driftscope.util import read_json, torch_dtype

# ------------------------------------------------------------------ the weight-name table (data, not code)
# HF name -> (our parameter name, fused part or None, condition on the config or None).
# A fused part is a row range of a fused parameter: q|k|v in attn.wqkv, gate|up in mlp.w_gate_up.
GLOBAL_WEIGHTS: dict[str, tuple[str, str | None, str | None]] = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", None, None),
    "model.norm.weight": ("norm.weight", None, None),
    "lm_head.weight": ("output.weight", None, "untied"),
}
LAYER_WEIGHTS: dict[str, tuple[str, str | None, str | None]] = {
    "input_layernorm.weight": ("attn_norm.weight", None, None),
    "post_attention_layernorm.weight": ("mlp_norm.weight", None, None),
    "self_attn.q_proj.weight": ("attn.wqkv.weight", "q", None),
    "self_attn.k_proj.weight": ("attn.wqkv.weight", "k", None),
    "self_attn.v_proj.weight": ("attn.wqkv.weight", "v", None),
    "self_attn.q_proj.bias": ("attn.wqkv.bias", "q", "qkv_bias"),
    "self_attn.k_proj.bias": ("attn.wqkv.bias", "k", "qkv_bias"),
    "self_attn.v_proj.bias": ("attn.wqkv.bias", "v", "qkv_bias"),
    "self_attn.o_proj.weight": ("attn.wo.weight", None, None),
    "self_attn.o_proj.bias": ("attn.wo.bias", None, "o_bias"),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", None, "qk_norm"),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", None, "qk_norm"),
    "mlp.gate_proj.weight": ("mlp.w_gate_up.weight", "gate", None),
    "mlp.up_proj.weight": ("mlp.w_gate_up.weight", "up", None),
    "mlp.down_proj.weight": ("mlp.w_down.weight", None, None),
    "mlp.gate_proj.bias": ("mlp.w_gate_up.bias", "gate", "mlp_bias"),
    "mlp.up_proj.bias": ("mlp.w_gate_up.bias", "up", "mlp_bias"),
    "mlp.down_proj.bias": ("mlp.w_down.bias", None, "mlp_bias"),
}
# Stored but never needed: rope tables that old checkpoints saved; a tied head that a checkpoint also saved.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
STORED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")


def _condition(name: str | None, c: ModelConfig) -> bool:
    return name is None or (not c.tie_word_embeddings if name == "untied" else bool(getattr(c, name)))


def _part_rows(c: ModelConfig, part: str) -> tuple[int, int]:
    """Row range [start, stop) of a fused part inside its fused parameter."""
    q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
    rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, inter), "up": (inter, 2 * inter)}
    return rows[part]


@dataclass(frozen=True)
class Target:
    param: str  # our parameter name
    rows: tuple[int, int] | None  # row range inside a fused parameter
    shape: tuple[int, ...]  # shape the HF tensor must have


def expected_weights(config: ModelConfig, model: Transformer | None = None) -> dict[str, Target]:
    """HF tensor name -> where it goes and what shape it must have, in checkpoint order (embeddings first)."""
    model = model if model is not None else Transformer(config, device="meta")
    params = dict(model.named_parameters())
    table = [("model.embed_tokens.weight", GLOBAL_WEIGHTS["model.embed_tokens.weight"])]
    table += [(f"model.layers.{i}.{hf}", (f"layers.{i}.{ours}", part, cond))
              for i in range(config.num_layers) for hf, (ours, part, cond) in LAYER_WEIGHTS.items()]
    table += [(hf, GLOBAL_WEIGHTS[hf]) for hf in ("model.norm.weight", "lm_head.weight")]
    out: dict[str, Target] = {}
    for hf, (ours, part, cond) in table:
        if not _condition(cond, config):
            continue
        assert ours in params, f"weight table names {ours}, which the model does not have"
        shape = tuple(params[ours].shape)
        rows = None
        if part is not None:
            rows = _part_rows(config, part)
            shape = (rows[1] - rows[0], *shape[1:])
        out[hf] = Target(ours, rows, shape)
    covered = {t.param for t in out.values()}
    assert covered == set(params), f"parameters not covered by the weight table: {sorted(set(params) - covered)}"
    return out


def _ignored(name: str, config: ModelConfig) -> bool:
    return name.endswith(IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")


# ------------------------------------------------------------------ checkpoint files
class _Source:
    """A set of tensor files: name -> file, with shape/dtype look-ups before any data is read; `index` and
    `weight_map`: the index file that lists the shards, and what it says is in each (None without one); `label`:
    the file's own name of an HF tensor name, for messages."""

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], opener,
                 index: Path | None = None, weight_map: dict[str, str] | None = None, label=None):
        self.files, self.shapes, self.dtypes, self._opener = files, shapes, dtypes, opener
        self.index, self.weight_map = index, weight_map
        self.label = label or (lambda name: name)  # HF name -> the name the file uses (GGUF: blk.N.attn_q.weight)

    def iter_tensors(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one tensor at a time, file by file."""
        by_file: dict[Path, list[str]] = {}
        for n in sorted(names):
            by_file.setdefault(self.files[n], []).append(n)
        for f, ns in by_file.items():
            with self._opener(f) as opened:
                for n in ns:
                    yield n, opened.get_tensor(n)


@contextmanager
def _safetensors(path: Path):
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as exc:
        raise InputError(f"{path}: cannot read safetensors file ({exc}); is it truncated or corrupt?") from exc


def _scan_safetensors(paths: list[Path], weight_map: dict | None = None, index: Path | None = None) -> _Source:
    files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for path in paths:
        with _safetensors(path) as f:
            for name in f.keys():
                if name in files:
                    raise InputError(f"{path}: tensor {name!r} is also stored in {files[name]}")
                sl = f.get_slice(name)
                files[name], shapes[name], dtypes[name] = path, tuple(sl.get_shape()), sl.get_dtype()
    return _Source(files, shapes, dtypes, _safetensors, index, weight_map)


def _scan_pickle(paths: list[Path]) -> _Source:
    """Only reached with allow_pickle=True; torch.load(weights_only=True) refuses arbitrary objects."""
    loaded: dict[Path, dict[str, torch.Tensor]] = {}
    files: dict[str, Path] = {}
    for path in paths:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError, EOFError) as exc:  # torch reports corrupt/unsafe pickles as these
            raise InputError(f"{path}: cannot load with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise InputError(f"{path}: expected a flat dict of tensors (a state_dict)")
        loaded[path] = sd
        for name in sd:
            files[name] = path
    shapes = {n: tuple(loaded[p][n].shape) for n, p in files.items()}
    rev = {v: k for k, v in STORED_DTYPES.items()}
    dtypes = {n: rev.get(loaded[p][n].dtype, str(loaded[p][n].dtype)) for n, p in files.items()}
    return _Source(files, shapes, dtypes, lambda p: nullcontext(SimpleNamespace(get_tensor=loaded[p].__getitem__)))


def _index_files(index: Path, suffix: str) -> tuple[list[Path], dict[str, str]]:
    """(the shard files an index lists, its weight_map); errors name the index file."""
    data = read_json(index, "weight index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: expected a non-empty 'weight_map' object")
    shards = sorted(set(weight_map.values()))
    for s in shards:
        if not str(s).endswith(suffix) or Path(s).name != s:
            raise InputError(f"{index}: shard name {s!r} must be a plain file name ending in {suffix}")
        if not (index.parent / s).is_file():
            raise FileNotFoundError(f"{index.parent / s}: shard listed in {index.name} is missing")
    return [index.parent / s for s in shards], weight_map


def _gguf_source(path: Path, config: ModelConfig) -> _Source:
    """A GGUF file's tensors under HF names; they yield float32 (dequantized), hence the stored dtype F32."""
    tensors = gguf.GGUFTensors(path, config)
    names = list(tensors.shapes)
    return _Source(dict.fromkeys(names, path), tensors.shapes, dict.fromkeys(names, "F32"),
                   lambda _: nullcontext(tensors), label=gguf.gguf_name)


def _find_source(root: Path, allow_pickle: bool) -> _Source:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return _scan_safetensors(*_index_files(index, ".safetensors"), index=index)
    if (root / "model.safetensors").is_file():
        return _scan_safetensors([root / "model.safetensors"])
    pickles = [root / n for n in PICKLE_NAMES if (root / n).is_file()] + sorted(root.glob("*.pt"))
    if pickles:
        if not allow_pickle:
            raise InputError(f"{pickles[0]}: pickle checkpoints can execute code when loaded, so they are refused; "
                             "convert to safetensors, or pass --allow-pickle (allow_pickle=True in Python) to load it "
                             "with torch.load(weights_only=True)")
        pindex = root / "pytorch_model.bin.index.json"
        return _scan_pickle(_index_files(pindex, ".bin")[0] if pindex.is_file() else [pickles[0]])
    raise FileNotFoundError(f"{root}: no model.safetensors or model.safetensors.index.json (nor a pickle checkpoint) "
                            "found")


def check_device(device: str | torch.device) -> torch.device:
    """The torch.device of `device`, refused (InputError naming it) when unknown or absent on this machine."""
    forms = "expected cpu, cuda, cuda:N (or another torch device type available here, e.g. mps)"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device={device!r} is not a torch device; {forms}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    backend = getattr(torch, dev.type, None)
    if dev.type not in ("cpu", "cuda") and not getattr(backend, "is_available", lambda: False)():
        raise InputError(f"device={device!r}: no {dev.type} backend is available here; {forms}")
    return dev


def _check_finite(name: str, file: Path, loaded: torch.Tensor, stored: torch.Tensor) -> None:
    """Refuse NaN/Inf in a weight as it will be used (after the cast to the model's dtype): one reduction, no copy."""
    lo, hi = loaded.aminmax() if loaded.numel() else (loaded.new_zeros(()),) * 2
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    bad = int((~torch.isfinite(loaded)).sum())
    if bool(torch.isfinite(stored).all()):  # the stored values are fine: the cast overflowed
        raise InputError(f"{file}: tensor {name!r} has {bad} values beyond the range of {loaded.dtype} "
                         f"(stored as {stored.dtype}); load it in bfloat16 or float32")
    raise InputError(f"{file}: tensor {name!r} holds {bad} non-finite values (NaN/Inf) of {loaded.numel()}; "
                     "the checkpoint is damaged or diverged")


# ------------------------------------------------------------------ the entry point and its steps
def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", *,
    allow_pickle: bool = False, stream_layers: bool = False,
) -> Transformer:
    """Load an HF-layout checkpoint folder, or a GGUF file (engine/gguf.py: tensors dequantized, mapped to HF names),
    into a Transformer on `device` in `dtype` (stored weights are cast).

    `stream_layers`: only the embedding, final norm and LM head are loaded; the decoder layers stay in the
    (memory-mapped) safetensors files and are copied to the device as they run (engine/streaming.py), after one pass
    that checks them. Never executes code from the checkpoint (auto_map / trust_remote_code are ignored).
    """
    root = Path(path)
    if gguf.is_gguf(root):
        if stream_layers:
            raise InputError(f"{root}: stream_layers=True (--stream-layers) is not supported for GGUF files (their "
                             "tensors are dequantized as they load); use an HF checkpoint folder")
        dtype, device = torch_dtype(dtype), check_device(device)
        config = gguf.read_config(root)
        source = _gguf_source(root, config)
    elif not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoint folder not found")
    else:
        dtype, device = torch_dtype(dtype), check_device(device)
        config = ModelConfig.from_file(root / "config.json")
        source = _find_source(root, allow_pickle)
    model = Transformer(config, device="meta", dtype=dtype)
    expected = expected_weights(config, model)
    _check_names(source, expected, config, root)
    _check_shapes(source, expected, config)
    if stream_layers:  # the layers' tensors go to StreamedLayers; the rest is loaded below
        expected = _stream_layers(model, source, expected, dtype)
    _empty_on(model, device)
    _copy_weights(model, source, expected)
    if stream_layers:
        model.layers.verify(_check_finite)
    model.requires_grad_(False)
    return model.eval()


def _empty_on(model: nn.Module, device: torch.device) -> None:
    """`model.to_empty(device=device)` without the meta device's `empty_like`, which imports torch's symbolic shapes
    (0.46 s of a command's start); a tensor shared by two modules stays one tensor."""
    made: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for name, t in [(n, t) for n, t in store.items() if t is not None]:
                if id(t) not in made:
                    e = torch.empty(t.shape, dtype=t.dtype, device=device)
                    made[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else e
                store[name] = made[id(t)]


def _check_names(source: _Source, expected: dict[str, Target], config: ModelConfig, root: Path) -> None:
    """Everything expected is stored (where the index says), nothing else is."""
    for name, shard in (source.weight_map or {}).items():
        if name not in source.files:
            raise InputError(f"{source.index}: tensor {name!r} is listed in shard {shard} but not stored there")
        if source.files[name].name != shard:
            raise InputError(f"{source.index}: tensor {name!r} is listed in {shard} but stored in "
                             f"{source.files[name]}")
    for name in sorted(source.files):
        if name not in expected and not _ignored(name, config):
            raise InputError(f"{source.files[name]}: unexpected tensor {source.label(name)!r} for {config.arch} "
                             f"(tie_word_embeddings={config.tie_word_embeddings}, qkv_bias={config.qkv_bias}, "
                             f"qk_norm={config.qk_norm})")
    for name in expected:
        if name not in source.files:
            stored = sorted({str(p) for p in source.files.values()})
            where = source.index if source.index is not None else ", ".join(stored) if stored else root
            raise InputError(f"{where}: missing tensor {source.label(name)!r} required by {config.source}")


def _check_shapes(source: _Source, expected: dict[str, Target], config: ModelConfig) -> None:
    """Every tensor's shape and stored dtype, before any data is read."""
    for name, target in expected.items():
        if (got := source.shapes[name]) != target.shape:
            raise InputError(f"{source.files[name]}: tensor {source.label(name)!r} has shape {list(got)}, expected "
                             f"{list(target.shape)} from {config.source}")
        if source.dtypes[name] not in STORED_DTYPES:
            raise InputError(f"{source.files[name]}: tensor {name!r} is stored as {source.dtypes[name]}; "
                             f"supported: {', '.join(STORED_DTYPES)}")


def _stream_layers(model: Transformer, source: _Source, expected: dict[str, Target],
                   dtype: torch.dtype) -> dict[str, Target]:
    """`model.layers` read from the (mapped) safetensors files as they run; returns the tensors left to load."""
    pickled = sorted({str(f) for f in source.files.values() if f.suffix != ".safetensors"})
    if pickled:
        raise InputError(f"{pickled[0]}: stream_layers=True (--stream-layers) maps safetensors files; convert "
                         "this pickle checkpoint to safetensors")
    layers: list[list[LayerTensor]] = [[] for _ in range(model.config.num_layers)]
    for name, t in expected.items():
        if t.param.startswith("layers."):  # "layers.{i}.{param inside the Block}"
            _, i, local = t.param.split(".", 2)
            layers[int(i)].append(LayerTensor(source.files[name], name, local, t.rows))
    model.layers = StreamedLayers(model.config, layers, dtype)
    return {n: t for n, t in expected.items() if not t.param.startswith("layers.")}


def _copy_weights(model: Transformer, source: _Source, expected: dict[str, Target]) -> None:
    """Into the allocated parameters, tensor by tensor (peak = model + one stored tensor), each checked finite."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    with torch.no_grad():
        for name, tensor in source.iter_tensors(set(expected)):
            target = expected[name]
            dst = params[target.param].data
            if target.rows is not None:
                dst = dst[target.rows[0] : target.rows[1]]
            dst.copy_(tensor)  # casts to the requested dtype and moves to the device
            _check_finite(source.label(name), source.files[name], dst, tensor)
            filled[target.param] = filled.get(target.param, 0) + target.shape[0]
            del tensor
    for pname in {t.param for t in expected.values()}:
        rows = params[pname].shape[0]
        assert filled.get(pname) == rows, f"{pname}: filled {filled.get(pname)} of {rows} rows"
