"""ModelConfig: the validated, architecture-neutral description of a Llama/Mistral/Qwen2/Qwen3 checkpoint.

`ModelConfig.from_file(config.json)` reads both HF config styles (rope_theta/rope_scaling and rope_parameters;
torch_dtype and dtype); unsupported architectures or rope types raise ValueError naming the file. Sliding windows and
rope parameters are read the way transformers reads them (Mistral: every layer; Qwen2/Qwen3: `use_sliding_window`,
layers >= `max_window_layers` or an explicit `layer_types`; Llama has none).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftscope.util import DTYPE_NAMES, read_json

# model_type -> per-family flags. `qkv_bias`: None means "read attention_bias from the config".
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"class": "LlamaForCausalLM", "qkv_bias": None, "o_bias": None, "qk_norm": False, "head_dim": None},
    "mistral": {"class": "MistralForCausalLM", "qkv_bias": False, "o_bias": False, "qk_norm": False, "head_dim": None},
    "qwen2": {"class": "Qwen2ForCausalLM", "qkv_bias": True, "o_bias": False, "qk_norm": False, "head_dim": None},
    # transformers' Qwen3Config defaults head_dim to 128 when the key is absent; we follow it for parity.
    "qwen3": {"class": "Qwen3ForCausalLM", "qkv_bias": None, "o_bias": None, "qk_norm": True, "head_dim": 128},
}
_CLASS_TO_TYPE = {v["class"]: k for k, v in ARCHITECTURES.items()}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# rope type -> (required, optional) keys of rope_scaling, as transformers' rope validators and init functions read them
ROPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("original_max_position_embeddings",),
             ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
    "llama3": (_LLAMA3_KEYS, ()),
}
ROPE_TYPES = tuple(ROPE_KEYS)
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    """Everything the forward needs. Derived fields (head_dim, n_kv_groups, q/kv sizes) are set in __post_init__."""

    arch: str  # one of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None  # None -> num_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # the rope type's ROPE_KEYS that the config sets
    partial_rotary_factor: float = 1.0  # rope rotates the first rotary_dim dims of each head
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None  # keys q - window < k <= q (transformers' overlay), None when disabled
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_TYPES; () -> every layer slides when a window is set
    hidden_act: str = "silu"
    torch_dtype: str = "float32"  # dtype the checkpoint says it was saved in (informational)
    eos_token_ids: tuple[int, ...] = ()  # config.json's eos_token_id (an int or a list): ends generation
    source: str = "<dict>"  # where this config came from, for error messages
    # derived
    n_kv_groups: int = field(init=False)
    q_size: int = field(init=False)
    kv_size: int = field(init=False)
    rotary_dim: int = field(init=False)  # 2·ceil(int(head_dim · partial_rotary_factor) / 2), as transformers rounds
    layer_windows: tuple[int | None, ...] = field(init=False)  # the window of each layer, None = full causal

    def _fail(self, name: str, value: Any, expected: str) -> None:
        raise ValueError(f"{self.source}: {name}={value!r} is invalid: {expected}")

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            self._fail("arch", self.arch, f"supported architectures are {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                self._fail(name, value, "expected a positive integer")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0:
            self._fail("num_key_value_heads", self.num_kv_heads, "expected a positive integer")
        if self.num_heads % self.num_kv_heads != 0:
            self._fail("num_key_value_heads", self.num_kv_heads, f"must divide num_attention_heads={self.num_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                self._fail("hidden_size", self.hidden_size,
                           f"must be divisible by num_attention_heads={self.num_heads} when head_dim is absent")
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2 != 0:
            self._fail("head_dim", self.head_dim, "expected a positive even integer (rope rotates pairs)")
        if not self.rms_norm_eps > 0:
            self._fail("rms_norm_eps", self.rms_norm_eps, "expected > 0")
        if not self.rope_theta > 0:
            self._fail("rope_theta", self.rope_theta, "expected > 0")
        self._check_rope()
        if self.hidden_act not in ("silu", "swish"):
            self._fail("hidden_act", self.hidden_act, "only silu (SwiGLU) MLPs are supported")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            self._fail("sliding_window", self.sliding_window, "expected a positive integer or null")
        self.layer_types = tuple(self.layer_types) or (LAYER_TYPES[self.sliding_window is not None],) * self.num_layers
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            self._fail("layer_types", self.layer_types, f"expected {self.num_layers} of {', '.join(LAYER_TYPES)}")
        self.layer_windows = tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)
        if self.torch_dtype not in DTYPE_NAMES:
            self._fail("dtype", self.torch_dtype, f"supported dtypes are {', '.join(DTYPE_NAMES)}")
        self.n_kv_groups = self.num_heads // self.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

    def _check_rope(self) -> None:
        t, s = self.rope_type, self.rope_scaling
        if t not in ROPE_KEYS:
            self._fail("rope_type", t, f"supported rope types are {', '.join(ROPE_TYPES)}")
        missing = [k for k in ROPE_KEYS[t][0] if s.get(k) is None]
        if missing:
            self._fail("rope_scaling", s, f"{t} rope needs {', '.join(missing)}")
        if not 0 < self.partial_rotary_factor <= 1 or int(self.head_dim * self.partial_rotary_factor) < 1:
            self._fail("partial_rotary_factor", self.partial_rotary_factor, "expected 0 < factor <= 1 (of head_dim)")
        self.rotary_dim = 2 * ((int(self.head_dim * self.partial_rotary_factor) + 1) // 2)
        if t in ("linear", "dynamic", "llama3") and not s["factor"] > 0:
            self._fail("rope_scaling", s, f"{t} rope needs factor > 0")
        if t == "dynamic" and self.rotary_dim <= 2:
            self._fail("partial_rotary_factor", self.partial_rotary_factor, "dynamic rope needs a rotary dim over 2")
        if t == "yarn" and int(self.head_dim * self.partial_rotary_factor) % 2:  # transformers' yarn fails on it too
            self._fail("partial_rotary_factor", self.partial_rotary_factor, "yarn rope needs an even rotary dim")
        if t == "llama3" and not s["high_freq_factor"] > s["low_freq_factor"]:
            self._fail("rope_scaling", s, "llama3 rope needs high_freq_factor > low_freq_factor")
        if t == "longrope":
            for k in ("short_factor", "long_factor"):
                if not isinstance(s[k], list) or len(s[k]) != self.rotary_dim // 2:
                    self._fail("rope_scaling", s, f"longrope {k} must be a list of rotary_dim/2 = "
                               f"{self.rotary_dim // 2} numbers")

    # ---------------------------------------------------------------- reading HF config.json
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read an HF `config.json` (or the folder that holds it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected an HF checkpoint folder)")
        return cls.from_dict(read_json(path, "model config", dict), source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Map an HF config dict (either rope/dtype style) onto ModelConfig. Ignores auto_map: no remote code."""
        arch = _arch_of(d, source)
        flags = ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in d:
                raise ValueError(f"{source}: required key {key!r} is missing")
            return d[key]

        attention_bias = bool(d.get("attention_bias", False))
        rope_type, rope_theta, rope_scaling, partial = _rope_of(d, source)
        sliding, layer_types = _window_of(arch, d, source)
        dtype = d.get("dtype", d.get("torch_dtype")) or "float32"
        eos = d.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
            raise ValueError(f"{source}: eos_token_id={d.get('eos_token_id')!r} must be a token id or a list of ids")
        return cls(
            arch=arch,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=need("num_attention_heads"),
            num_kv_heads=d.get("num_key_value_heads"),
            head_dim=flags["head_dim"] if d.get("head_dim") is None else d["head_dim"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"],
            o_bias=attention_bias if flags["o_bias"] is None else flags["o_bias"],
            mlp_bias=bool(d.get("mlp_bias", False)) if arch == "llama" else False,
            qk_norm=flags["qk_norm"],
            sliding_window=sliding,
            layer_types=layer_types,
            hidden_act=d.get("hidden_act", "silu"),
            torch_dtype=str(dtype).removeprefix("torch."),
            eos_token_ids=tuple(eos),
            source=source,
        )


def _arch_of(d: dict[str, Any], source: str) -> str:
    supported = ", ".join(f"{k} ({v['class']})" for k, v in ARCHITECTURES.items())
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type is not None and model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; supported: {supported}")
    for a in archs:
        if a not in _CLASS_TO_TYPE:
            raise ValueError(f"{source}: architectures={archs!r} is not supported; supported: {supported}")
        if model_type is not None and _CLASS_TO_TYPE[a] != model_type:
            raise ValueError(f"{source}: architectures={archs!r} disagrees with model_type={model_type!r}")
    if model_type is None:
        if not archs:
            raise ValueError(f"{source}: neither model_type nor architectures is set; supported: {supported}")
        model_type = _CLASS_TO_TYPE[archs[0]]
    return model_type


def _window_of(arch: str, d: dict[str, Any], source: str) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) with transformers' defaults: MistralConfig's window is 4096 when the key is
    absent and covers every layer; Qwen2/Qwen3 slide only with use_sliding_window, in layers >= max_window_layers
    (default 28) unless config.json lists layer_types; Llama has no sliding window."""
    if arch == "mistral":
        return d.get("sliding_window", 4096), ()
    if arch not in ("qwen2", "qwen3") or not d.get("use_sliding_window", False):
        return None, ()
    window, n = d.get("sliding_window", 4096), d.get("num_hidden_layers")
    if window is None:
        return None, ()
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", 28)
        if not isinstance(first, int) or not isinstance(n, int):
            raise ValueError(f"{source}: max_window_layers={first!r} must be an integer")
        types = [LAYER_TYPES[i >= first] for i in range(n)]
    return window, tuple(types)


def _rope_of(d: dict[str, Any], source: str) -> tuple[str, float, dict[str, Any], float]:
    """(rope_type, theta, scaling params, partial_rotary_factor) from rope_parameters (transformers 5) or
    rope_theta + rope_scaling; original_max_position_embeddings defaults to max_position_embeddings as transformers'
    standardize_rope_params does for llama3/yarn/longrope."""
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
    else:
        if not isinstance(params, dict):
            raise ValueError(f"{source}: rope_parameters={params!r} must be an object")
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"{source}: per-layer-type rope_parameters {sorted(params)} are not supported")
        params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
    if rope_type not in ROPE_KEYS:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; "
                         f"supported rope types: {', '.join(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if (rope_type in ("llama3", "yarn", "longrope") and params.get("original_max_position_embeddings") is None
            and "max_position_embeddings" in d):
        params["original_max_position_embeddings"] = d["max_position_embeddings"]
    required, optional = ROPE_KEYS[rope_type]
    scaling = {k: params[k] if isinstance(params[k], (bool, list)) else float(params[k])
               for k in required + optional if params.get(k) is not None}
    theta = params["rope_theta"] if params.get("rope_theta") is not None else d.get("rope_theta", 10000.0)
    return rope_type, float(theta), scaling, float(1.0 if partial is None else partial)
