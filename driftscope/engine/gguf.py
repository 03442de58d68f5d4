"""GGUF files (llama.cpp's format) as checkpoints: the config from the metadata, the tensors dequantized to float32
under their HF names in HF layout (loader.py then checks and copies them as for safetensors), and an identity.

Needs the `gguf` library (made by the llama.cpp project), imported lazily; the tokenizer is in gguf_tokenizer.py.
Every failure on a bad file is one InputError line naming the file and the offending field, tensor or type.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from driftscope.engine.config import ModelConfig
from driftscope.engine.gguf_file import GGUFFile
from driftscope.errors import InputError
from driftscope.util import sampled_digest

MAGIC = b"GGUF"
ARCHS = ("llama", "qwen2", "qwen3")  # general.architecture values (llama.cpp writes Mistral and SmolLM as llama)
# GGUF tensor name -> HF name (the loader's weight table takes it from there); per layer blk.{i}. / model.layers.{i}.
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias", "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_HF, _LAYER_HF = ({v: k for k, v in table.items()} for table in (GLOBAL_TENSORS, LAYER_TENSORS))
# llama.cpp's rope.scaling.type -> our rope type (llama3 rope is stored as a rope_freqs tensor: refused below)
ROPE_SCALING = {"none": "default", "linear": "linear", "yarn": "yarn"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("reading GGUF files needs the gguf library: pip install driftscope[gguf] "
                         "(or pip install gguf)") from None
    return gguf


def is_gguf(path: str | Path) -> bool:
    """True for a file that starts with b"GGUF"; a missing or non-GGUF path named *.gguf is refused."""
    p = Path(path)
    named = p.suffix.lower() == ".gguf"
    if not p.is_file():
        if named:
            raise FileNotFoundError(f"{p}: GGUF file not found")
        return False
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC and named:
        raise InputError(f"{p}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    return magic == MAGIC


@functools.lru_cache(maxsize=4)
def _open(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    """The parsed header of `path` (tensors stay memory-mapped), once per file version."""
    return GGUFFile(path, {int(k): v for k, v in _gguf().GGML_QUANT_SIZES.items()})


def reader(path: str | Path) -> GGUFFile:
    """The (cached) GGUFFile of an existing GGUF file."""
    p = Path(path)
    if not is_gguf(p):
        raise InputError(f"{p}: not a GGUF file (expected the magic {MAGIC!r})")
    st = p.stat()
    return _open(p, st.st_mtime_ns, st.st_size)


def field(r: GGUFFile, path: Path, key: str, default: Any = None, required: bool = False) -> Any:
    """The value of metadata `key` (scalar, string or list), `default` when absent."""
    if key not in r.metadata:
        if required:
            raise InputError(f"{path}: metadata key {key!r} is missing")
        return default
    return r.metadata[key]


def _positive(r, path: Path, key: str) -> int:
    v = field(r, path, key, required=True)
    if isinstance(v, list):  # per-layer values (e.g. head_count_kv of hybrid models): only uniform ones
        if not v or len(set(v)) != 1:
            raise InputError(f"{path}: {key}={v!r} varies per layer; only one value for all layers is supported")
        v = v[0]
    if not isinstance(v, int) or v <= 0:
        raise InputError(f"{path}: {key}={v!r} is invalid: expected a positive integer")
    return v


def read_config(path: Path) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata and tensor names only (no tensor data is read)."""
    path = Path(path)
    r = reader(path)
    arch = field(r, path, "general.architecture", required=True)
    if arch not in ARCHS:
        raise InputError(f"{path}: general.architecture={arch!r} is not supported; supported: {', '.join(ARCHS)}")
    names = set(r.tensors)
    if "rope_freqs.weight" in names:
        raise InputError(f"{path}: tensor 'rope_freqs.weight' (per-dimension rope frequency factors, e.g. llama3 "
                         "rope) is not supported; use the HF checkpoint folder")
    k = functools.partial(field, r, path)
    heads = _positive(r, path, f"{arch}.attention.head_count")
    hidden = _positive(r, path, f"{arch}.embedding_length")
    head_dim = k(f"{arch}.attention.key_length") or hidden // heads
    rotary = k(f"{arch}.rope.dimension_count") or head_dim
    scaling_type = k(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ROPE_SCALING:
        raise InputError(f"{path}: {arch}.rope.scaling.type={scaling_type!r} is not supported; supported: "
                         f"{', '.join(ROPE_SCALING)}")
    scaling: dict[str, Any] = {}
    if ROPE_SCALING[scaling_type] != "default":
        scaling["factor"] = float(k(f"{arch}.rope.scaling.factor", 1.0))
        if (orig := k(f"{arch}.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = float(orig)
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if scaling_type == "yarn" and (v := k(f"{arch}.rope.scaling.{theirs}")) is not None:
                scaling[ours] = float(v)
    vocab = k(f"{arch}.vocab_size") or len(k("tokenizer.ggml.tokens", []))
    window = k(f"{arch}.attention.sliding_window")
    eos = [k(f"tokenizer.ggml.{t}_token_id") for t in ("eos", "eot", "eom")]
    try:
        return ModelConfig(
            arch=arch, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=_positive(r, path, f"{arch}.feed_forward_length"),
            num_layers=_positive(r, path, f"{arch}.block_count"), num_heads=heads,
            num_kv_heads=_positive(r, path, f"{arch}.attention.head_count_kv") if
            f"{arch}.attention.head_count_kv" in r.metadata else heads,
            head_dim=head_dim, rms_norm_eps=float(k(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(k(f"{arch}.rope.freq_base", 10000.0)), rope_type=ROPE_SCALING[scaling_type],
            rope_scaling=scaling, partial_rotary_factor=rotary / head_dim,
            max_position_embeddings=int(k(f"{arch}.context_length", 32768)),
            tie_word_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
            o_bias="blk.0.attn_output.bias" in names, mlp_bias="blk.0.ffn_gate.bias" in names,
            qk_norm=arch == "qwen3", sliding_window=window or None,
            eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)), source=str(path),
        )
    except (ValueError, TypeError) as exc:  # ModelConfig names the field; say which file's metadata it came from
        raise InputError(f"{path}: metadata gives an invalid config: {exc}") from None


def hf_name(name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name, None for names outside the table."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    return None


def _type_name(type_id: int) -> str:
    try:
        return _gguf().GGMLQuantizationType(type_id).name
    except ValueError:
        return f"id {type_id} (unknown to the gguf library)"


def gguf_name(name: str) -> str:
    """The GGUF tensor name of an HF tensor name (the name itself for names outside the table)."""
    if name in _GLOBAL_HF:
        return _GLOBAL_HF[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_HF:
        return f"blk.{parts[2]}.{_LAYER_HF[parts[3]]}"
    return name


@functools.lru_cache(maxsize=None)
def _dequantizable(type_id: int) -> bool:
    """Whether gguf.quants.dequantize handles the type (probed on one zero block)."""
    gguf = _gguf()
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):  # unknown to the library, or no dequantizer
        return False
    return True


class GGUFTensors:
    """The tensors of a GGUF file under HF names: `shapes` (HF [out, in] order) and `get_tensor(hf_name)`: float32,
    dequantized, llama's q/k row permutation undone."""

    def __init__(self, path: Path, config: ModelConfig):
        self.path, self.config = Path(path), config
        self._file = reader(self.path)
        self.arch = field(self._file, self.path, "general.architecture")
        self._names: dict[str, str] = {}  # HF name -> GGUF name
        self.shapes: dict[str, tuple[int, ...]] = {}
        for gname, t in self._file.tensors.items():
            name = hf_name(gname)
            if name is None:
                raise InputError(f"{self.path}: unexpected tensor {gname!r} for {self.arch}")
            if not _dequantizable(t.type_id):
                raise InputError(f"{self.path}: tensor {gname!r} has type {_type_name(t.type_id)}, which the gguf "
                                 "library cannot dequantize; requantize it to another type (e.g. Q8_0, Q4_K, F16)")
            self._names[name] = gname
            self.shapes[name] = t.shape

    def get_tensor(self, name: str) -> torch.Tensor:
        gguf, t = _gguf(), self._file.tensors[self._names[name]]
        qtype = gguf.GGMLQuantizationType(t.type_id)
        raw = self._file.data(t.name, gguf.quants.quant_shape_to_byte_shape(t.shape, qtype))
        w = gguf.quants.dequantize(raw, qtype).reshape(t.shape)
        c = self.config
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            # convert_hf_to_gguf.py interleaves each head's rotary halves: rows (h, 2, d/2) -> (h, d/2, 2); undo it
            heads = c.num_heads if "q_proj" in name else c.num_kv_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        w = np.ascontiguousarray(w, dtype=np.float32)
        with warnings.catch_warnings():  # F32 tensors are read-only views of the map: the loader only copies from them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(w)


def identity(path: str | Path) -> dict:
    """What identifies a GGUF file's contents without reading it all (for resume fingerprints)."""
    p = Path(path)
    return {"gguf": sampled_digest(p)}
