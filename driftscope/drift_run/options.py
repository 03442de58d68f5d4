"""Options of a drift run, validated once; `fingerprint()` names what a resumed run must share with the original."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from driftscope.cli_options import check_ranges, cli, results
from driftscope.engine.checkpoint import LORA_MODES, Checkpoint
from driftscope.engine.sampling import Decoding, SamplingParams
from driftscope.errors import InputError
from driftscope.probes.lens import parse_lens
from driftscope.options import (BatchOptions, EngineOptions, ModelOptions, PromptOptions, RunOptions,
                                ThinkingOptions)
from driftscope.util import file_digest

PCA_MODES = ("streaming", "paper", "none")
CKA_MODES = ("auto", "full", "projected", "none")
STATE_FORMAT = 7  # layout of the resumable state (6: each PairProbes has KLDStats; 7: "lens.*", "m{j}.examples.*")


@dataclass
class DriftOptions(RunOptions, ModelOptions, PromptOptions, ThinkingOptions, EngineOptions, BatchOptions, Decoding):
    """Every option of a drift run: the shared parts (driftscope.options, the decoding options of SamplingParams) and
    the drift app's own; each field's cli() metadata makes its `driftscope drift` flag."""

    max_seq_len: int | None = field(default=None, metadata=cli(
        "keep the first N tokens of each sample (default: all)", ge=2))
    # a model per device: layer i of each model runs on its device; probes run on the base's (see engine/runner.py)
    base_device: str | None = field(default=None, metadata=cli(
        "device of the base model (default: --device); under torchrun cuda:i is the i-th GPU of each process's group",
        cosmetic=True))
    tuned_device: tuple = field(default=(), metadata=cli(
        "device of the tuned models: once for all, or once per --tuned in order (default: --device; under torchrun "
        "relative to each process's group of GPUs, like --base-device)", cosmetic=True))
    stream_layers: bool = field(default=False, metadata=cli(
        "weights stay in host memory (memory-mapped safetensors); each layer is copied to its device just before it "
        "runs, overlapped with the previous layer's compute: for models that do not fit device memory", cosmetic=True))
    lora: str = field(default="auto", metadata=cli(
        "LoRA adapters given as --tuned: merge (each into a copy of the base's weights: fastest per token), side "
        "(low-rank side paths on the base's shared weights: J adapters cost one base + J adapters; equal to merge "
        "within float32 rounding) or auto (merge while a copy per adapter fits in half the free memory)",
        choices=LORA_MODES))
    share_prefix: bool = field(default=True, metadata=cli(
        "run the token prefix all samples of a batch start with (an instruction every record repeats) once per batch "
        "instead of once per sample: the same results within float32 rounding, fewer rows through the models"))
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
    lens: str | None = field(default=None, metadata=cli(
        "logit-lens drift at hidden-state indices 0..L (L: after the final norm): all, every:K (0, K, 2K, ... and L) "
        "or i,j,k; each model read through its own final norm and LM head, compared exactly like the output, and "
        "against its own output; plus the tokens the mean state difference promotes (default: off, no cost)",
        metavar="LAYERS"))
    lens_top_k: int = field(default=20, metadata=cli(
        "--lens: promoted and suppressed tokens kept per index", ge=1, cosmetic=True))
    examples: int = field(default=0, metadata=cli(
        "keep the K samples with the largest mean KL(tuned ‖ base) (tokens, per-token KL) and the K tokens with the "
        "largest KL (context ids, both models' top-5 next tokens) per task and tuned model (0: off)", ge=0,
        metavar="K"))
    report: bool = field(default=True, metadata=cli(
        "write report.html (its plots take seconds per tuned model; a sweep turns it off: its report has the curves)",
        cosmetic=True))
    top_tokens: int = field(default=200, metadata=cli(
        "rows of the shifted-token table in summary.json (the token table file has all)", ge=0, cosmetic=True))
    checkpoint_every: float = field(default=30.0, metadata=cli(
        "min seconds between resumable checkpoints, stretched to keep saving <= ~10% of the time (0: every batch)",
        ge=0, cosmetic=True))
    resume: bool = field(default=False, metadata=cli("continue an interrupted run in --out", cosmetic=True))
    allow_pickle: bool = field(default=False, metadata=cli(
        "also load pickle checkpoints (.bin/.pt), with torch.load(weights_only=True)"))
    # drift while generating: each tuned model generates from the records' prompts, the base follows in lockstep
    generate: bool = field(default=False, metadata=cli(
        "each tuned model generates from the records' prompts and the base follows in lockstep: drift measured in "
        "the generation pass (no response files needed)"))
    generate_chunk: int = field(default=256, metadata=cli("--generate: prompts per resumable unit", ge=1))

    def sampling(self) -> SamplingParams:
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(Decoding)})

    def __post_init__(self) -> None:
        self.resolve_model()  # dtype: a JSON-able name in the config and fingerprint
        check_ranges(DriftOptions, vars(self))  # every number and choice, named with its flag
        self.stop = list(self.stop) if not isinstance(self.stop, str) else [self.stop]  # JSON-able in the fingerprint
        self.progress = True if self.progress is None else self.progress  # drift's bars: on unless turned off
        if self.generate:
            self.sampling()  # refuse bad decoding options now, naming the value
        PromptOptions.__post_init__(self)
        self.device = _device_name("device", self.device)
        self.base_device = None if self.base_device is None else _device_name("base_device", self.base_device)
        tuned = [self.tuned_device] if isinstance(self.tuned_device, (str, torch.device)) else self.tuned_device
        self.tuned_device = [_device_name("tuned_device", d) for d in tuned]  # a list: JSON-able
        if self.stream_layers and self.generate:
            raise InputError("stream_layers=True (--stream-layers) with generate=True: generation runs every layer "
                             "once per decoded token, so streamed weights would be copied once per token; drop one")
        lens_on = parse_lens(self.lens) is not None  # the syntax now; the range once the model's layers are known
        for name, on in (("lens", lens_on), ("examples", self.examples > 0)):
            if on and self.generate:
                raise InputError(f"{name}={getattr(self, name)!r} (--{name}) with generate=True (--generate): it runs "
                                 "on records' responses (lockstep) only; drop one")
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


def fingerprint(base: Checkpoint, tuned: dict[str, Checkpoint], data: dict[str, Path], options: DriftOptions) -> dict:
    """Everything a resumed run must share with the run it continues, as a JSON-able dict."""
    return {
        "base": str(base.path.resolve()),
        "tuned": {k: str(v.path.resolve()) for k, v in tuned.items()},
        "checkpoints": {"base": base.identity(), "tuned": {k: v.identity() for k, v in tuned.items()}},
        "data": {k: {"path": str(v.resolve()), "sha256": file_digest(v)} for k, v in data.items()},
        "options": results(options),
        "pca_texts": file_digest(Path(options.pca_texts)) if options.pca_texts is not None else None,
        "state_format": STATE_FORMAT,
    }
