"""Options of a drift run, validated once; `fingerprint()` names what a resumed run must share with the original."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from driftscope.cli_options import as_object, check_ranges, cli, json_object, on_off, size
from driftscope.engine.data import OVERLONG
from driftscope.errors import InputError
from driftscope.util import DTYPE_NAMES, checkpoint_identity, dtype_name, file_digest

PCA_MODES = ("streaming", "paper", "none")
CKA_MODES = ("auto", "full", "projected", "none")
STATE_FORMAT = 4  # layout of the resumable state (4: a probe bundle per task, hidden-state sums with the base once)


@dataclass
class DriftOptions:
    """Every option of a drift run; each field's cli() metadata makes its `driftscope drift` flag."""

    max_batch_tokens: int = field(default=8192, metadata=cli(
        "token budget of one packed batch: bounds activation memory", ge=1))
    max_seq_len: int | None = field(default=None, metadata=cli(
        "keep the first N tokens of each sample (default: all)", ge=2))
    overlong: str = field(default="error", metadata=cli(
        "records longer than the models' context (max_position_embeddings; with --generate: prompt + "
        "--max-new-tokens): error refuses them, naming them; truncate scores their first tokens (with --generate: "
        "stops generating at the context)", choices=OVERLONG))
    device: str = field(default="cpu", metadata=cli("torch device, e.g. cpu, cuda, cuda:1"))
    # a model per device: layer i of each model runs on its device; probes run on the base's (see engine/runner.py)
    base_device: str | None = field(default=None, metadata=cli(
        "device of the base model (default: --device); under torchrun cuda:i is the i-th GPU of each process's group"))
    tuned_device: tuple = field(default=(), metadata=cli(
        "device of the tuned models: once for all, or once per --tuned in order (default: --device; under torchrun "
        "relative to each process's group of GPUs, like --base-device)"))
    stream_layers: bool = field(default=False, metadata=cli(
        "weights stay in host memory (memory-mapped safetensors); each layer is copied to its device just before it "
        "runs, overlapped with the previous layer's compute: for models that do not fit device memory"))
    dtype: str = field(default="float32", metadata=cli("dtype of the weights and the computation", choices=DTYPE_NAMES))
    # streaming: Σx, Σxxᵀ over scored tokens; paper: the paper's k-query procedure
    pca: str = field(default="streaming", metadata=cli(
        "hidden-state PCA: streaming (moments of the scored tokens), paper (the paper's k-query procedure) or none",
        choices=PCA_MODES))
    pca_queries: int = field(default=30, metadata=cli("paper mode: number of query texts (k)", ge=2))
    pca_seed: int = field(default=42, metadata=cli(
        "paper mode: random.seed(N) before shuffling the query texts", ge=0))
    pca_max_length: int = field(default=128, metadata=cli("paper mode: query texts truncated to N tokens", ge=1))
    pca_texts: str | None = field(default=None, metadata=cli(
        "paper mode: plain-text file of queries, one per line (default: the records' prompts)"))
    cka: str = field(default="auto", metadata=cli(
        "hidden-state CKA: auto (full when hidden_size <= 1024, else projected), full, projected or none",
        choices=CKA_MODES))
    cka_proj_dim: int = field(default=256, metadata=cli(
        "projected CKA: dimension of the random projection", ge=1))
    top_tokens: int = field(default=200, metadata=cli(
        "rows of the shifted-token table in summary.json (the token table file has all)", ge=0))
    checkpoint_every: float = field(default=30.0, metadata=cli(
        "min seconds between resumable checkpoints, stretched to keep saving <= ~10% of the time (0: every batch)",
        ge=0))
    resume: bool = field(default=False, metadata=cli("continue an interrupted run in --out"))
    overwrite: bool = field(default=False, metadata=cli(
        "discard the interrupted run in --out and start over (without it, such a run is never discarded)"))
    progress: bool = field(default=True, metadata=cli("progress bars on stderr"))
    dist_timeout: float = field(default=1800.0, metadata=cli(
        "under torchrun: seconds a process waits for the others (the merge waits for the slowest share)", gt=0))
    allow_pickle: bool = field(default=False, metadata=cli(
        "also load pickle checkpoints (.bin/.pt), with torch.load(weights_only=True)"))
    chat_template_kwargs: dict = field(default_factory=dict, metadata=cli(
        'JSON object passed to the chat template, e.g. \'{"enable_thinking": false}\'', type=json_object,
        metavar="JSON"))
    # drift while generating: each tuned model generates from the records' prompts, the base follows in lockstep
    generate: bool = field(default=False, metadata=cli(
        "each tuned model generates from the records' prompts and the base follows in lockstep: drift measured in "
        "the generation pass (no response files needed)"))
    max_new_tokens: int = field(default=512, metadata=cli("tokens to generate at most", group="decoding", ge=1))
    temperature: float = field(default=0.0, metadata=cli("0 = greedy", group="decoding", ge=0))
    top_p: float = field(default=1.0, metadata=cli(
        "nucleus sampling mass in (0, 1]", group="decoding", gt=0, le=1))
    top_k: int = field(default=0, metadata=cli(
        "keep the k most likely tokens; 0 = off", group="decoding", ge=0))
    seed: int = field(default=0, metadata=cli(
        "seed of the per-sequence random streams", group="decoding", ge=0))
    stop: tuple = field(default=(), metadata=cli("stop string (repeatable); trimmed from the output", group="decoding"))
    ignore_eos: bool = field(default=False, metadata=cli("do not stop at EOS (fixed-length benchmarks)",
                                                         group="decoding"))
    chat: bool = field(default=False, metadata=cli(
        "render 'prompt' fields as a user message with the chat template", group="decoding"))
    system: str | None = field(default=None, metadata=cli("system prompt for --chat", group="decoding"))
    thinking: bool | None = field(default=None, metadata=cli(
        "on/off: the template's enable_thinking (Qwen3)", type=on_off, metavar="{on,off}", group="decoding"))
    prompt_field: str | None = field(default=None, metadata=cli(
        "--generate: record field holding the prompt", flag="--field", metavar="FIELD"))
    generate_chunk: int = field(default=256, metadata=cli("--generate: prompts per resumable unit", ge=1))
    # KV cache bytes for base + tuned (default: see engine/kv_cache.py)
    cache_memory: int | None = field(default=None, metadata=cli(
        "KV cache budget, e.g. 2GiB (default: 90% of free GPU memory, a quarter of RAM on the CPU)", type=size,
        group="decoding", ge=1))
    max_num_seqs: int = field(default=256, metadata=cli(
        "sequences decoded together at most", group="decoding", ge=1))

    def sampling(self):
        from driftscope.engine.sampling import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=tuple(self.stop), ignore_eos=self.ignore_eos)

    def __post_init__(self) -> None:
        check_ranges(DriftOptions, vars(self))  # every number, named with its flag
        self.stop = list(self.stop) if not isinstance(self.stop, str) else [self.stop]  # JSON-able in the fingerprint
        if self.generate:
            self.sampling()  # refuse bad decoding options now, naming the value
        if self.overlong not in OVERLONG:
            raise InputError(f"overlong={self.overlong!r} is invalid: expected one of {', '.join(OVERLONG)}")
        self.chat_template_kwargs = as_object(self.chat_template_kwargs, "chat_template_kwargs=")
        self.dtype = dtype_name(self.dtype)  # a JSON-able name in the config and fingerprint
        self.device = _device_name("device", self.device)
        self.base_device = None if self.base_device is None else _device_name("base_device", self.base_device)
        tuned = [self.tuned_device] if isinstance(self.tuned_device, (str, torch.device)) else self.tuned_device
        self.tuned_device = [_device_name("tuned_device", d) for d in tuned]  # a list: JSON-able
        if self.stream_layers and self.generate:
            raise InputError("stream_layers=True (--stream-layers) with generate=True: generation runs every layer "
                             "once per decoded token, so streamed weights would be copied once per token; drop one")
        if self.pca not in PCA_MODES:
            raise ValueError(f"pca must be one of {PCA_MODES}, got {self.pca!r}")
        if self.cka not in CKA_MODES:
            raise ValueError(f"cka must be one of {CKA_MODES}, got {self.cka!r}")
        if self.pca_texts is not None and not Path(self.pca_texts).is_file():
            raise FileNotFoundError(f"pca_texts file {self.pca_texts} does not exist")

    def model_devices(self, n_tuned: int) -> tuple[str, list[str]]:
        """(the base's device, each tuned model's); InputError naming the option when they do not fit the run."""
        td = self.tuned_device
        if len(td) not in (0, 1, n_tuned):
            raise InputError(f"tuned_device (--tuned-device) is given {len(td)} times for {n_tuned} tuned models: "
                             "give it once (for all of them) or once per --tuned, in order")
        base = self.base_device or self.device
        tuned = td * n_tuned if len(td) == 1 else td or [self.device] * n_tuned
        spread = {"cuda:0" if d == "cuda" else d for d in (base, *tuned)}
        mode = "generate=True (--generate)" if self.generate else "pca='paper'" if self.pca == "paper" else None
        if len(spread) > 1 and mode is not None:
            raise InputError(f"{mode} runs every model on one device, but base_device/tuned_device (--base-device/"
                             f"--tuned-device) spread them over {', '.join(sorted(spread))}")
        return base, list(tuned)

    def cka_mode(self, hidden_size: int) -> str:
        if self.cka != "auto":
            return self.cka
        return "full" if hidden_size <= 1024 else "projected"

    def as_dict(self) -> dict:
        return asdict(self)

    # fields that do not change any number of the result
    _COSMETIC = ("checkpoint_every", "resume", "overwrite", "progress", "top_tokens", "device", "cache_memory",
                 "max_num_seqs", "base_device", "tuned_device", "stream_layers", "dist_timeout")

    def result_fields(self) -> dict:
        return {k: v for k, v in self.as_dict().items() if k not in self._COSMETIC}


def _device_name(name: str, value) -> str:
    """`value` as a device string, refused (InputError naming the option) when torch or this machine has no such
    device; the models' loads check it again (engine.loader.check_device)."""
    value = str(value)
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise InputError(f"{name}={value!r} (--{name.replace('_', '-')}) is not a torch device string "
                         "(e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{name}={value!r}: CUDA is not available here (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{name}={value!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return value


def fingerprint(base: Path, tuned: dict[str, Path], data: dict[str, Path], options: DriftOptions) -> dict:
    """Everything a resumed run must share with the run it continues, as a JSON-able dict."""
    return {
        "base": str(base.resolve()),
        "tuned": {k: str(v.resolve()) for k, v in tuned.items()},
        "checkpoints": {"base": checkpoint_identity(base),
                        "tuned": {k: checkpoint_identity(v) for k, v in tuned.items()}},
        "data": {k: {"path": str(v.resolve()), "sha256": file_digest(v)} for k, v in data.items()},
        "options": json.loads(json.dumps(options.result_fields())),
        "pca_texts": file_digest(Path(options.pca_texts)) if options.pca_texts is not None else None,
        "state_format": STATE_FORMAT,
    }
