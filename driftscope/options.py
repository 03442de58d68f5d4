"""The parts that DriftOptions, GenerateOptions, EvalOptions and SamplingParams are built from: each option declared
once, with its help, default, range and whether it changes results (`cli(..., cosmetic=True)`: it does not)."""
from __future__ import annotations

from dataclasses import dataclass, field

from driftscope.cli_options import as_object, check_ranges, cli, json_object, on_off, size
from driftscope.engine.data import OVERLONG
from driftscope.util import DTYPE_NAMES, dtype_name

__all__ = ["ModelOptions", "PromptOptions", "ThinkingOptions", "EngineOptions", "BatchOptions",
           "LimitOptions", "SeedOptions", "RunOptions", "GenerationOptions", "LMOptions"]


@dataclass
class ModelOptions:
    """Where and in what precision the model runs (None and auto: each command's default, resolved once)."""

    device: str | None = field(default=None, metadata=cli(
        "torch device, e.g. cpu, cuda, cuda:1 (default: cpu; eval: cuda when there is one)", cosmetic=True))
    dtype: str = field(default="auto", metadata=cli(
        "dtype of the weights and the computation; auto: float32 (eval: on a GPU the checkpoint's torch_dtype, else "
        "bfloat16)", choices=("auto", *DTYPE_NAMES)))
    dist_timeout: float = field(default=1800.0, metadata=cli(
        "under torchrun: seconds a process waits for the others (the merge, or rank 0, waits for the slowest share)",
        gt=0, cosmetic=True))

    def resolve_model(self) -> None:  # drift's and generate's defaults (the CPU, float32); torch.float16 -> float16
        self.device = "cpu" if self.device is None else self.device
        self.dtype = dtype_name("float32" if self.dtype == "auto" else self.dtype)


@dataclass
class PromptOptions:
    """How a record becomes a prompt."""

    prompt_field: str | None = field(default=None, metadata=cli(  # default: records.PROMPT_FIELDS
        "record field holding the prompt (default: messages, input, prompt, question, problem or text, the first "
        "present)", flag="--field", metavar="FIELD"))
    chat: bool = field(default=False, metadata=cli(
        "render 'prompt' fields as a user message with the chat template", group="decoding"))
    system: str | None = field(default=None, metadata=cli("system prompt for --chat", group="decoding"))
    chat_template_kwargs: dict = field(default_factory=dict, metadata=cli(
        'JSON object passed to the chat template, e.g. \'{"enable_thinking": false}\'', type=json_object,
        metavar="JSON"))

    def __post_init__(self) -> None:
        self.chat_template_kwargs = as_object(self.chat_template_kwargs, "chat_template_kwargs=")


@dataclass
class ThinkingOptions:
    thinking: bool | None = field(default=None, metadata=cli(
        "on/off: the chat template's enable_thinking (Qwen3)", type=on_off, metavar="{on,off}", group="decoding"))


@dataclass
class EngineOptions:
    """The generation engine's memory and batch limits (they change no result)."""

    cache_memory: int | None = field(default=None, metadata=cli(  # default: see engine/kv_cache.py
        "KV cache budget, e.g. 2GiB (default: 90% of free GPU memory, a quarter of RAM on the CPU)", type=size,
        group="decoding", ge=1, cosmetic=True))
    max_num_seqs: int = field(default=256, metadata=cli(
        "sequences decoded together at most", group="decoding", ge=1, cosmetic=True))


@dataclass
class BatchOptions:
    max_batch_tokens: int = field(default=8192, metadata=cli(
        "token budget of one packed batch (and of one generation step): bounds activation memory", ge=1))


@dataclass
class LimitOptions:
    limit: int | None = field(default=None, metadata=cli(
        "the first N usable records only (eval: the first N docs of each benchmark)", ge=1))


@dataclass
class SeedOptions:
    seed: int = field(default=0, metadata=cli(  # < 2**32: numpy's seeds (lm-eval's)
        "seed of the per-sequence random streams (eval: and of lm-eval)", group="decoding", ge=0, le=2**32 - 1))


@dataclass
class RunOptions:
    """How a command runs: its output, its bars, its over-long inputs."""

    overlong: str = field(default="error", metadata=cli(
        "inputs longer than the model's context (max_position_embeddings; when generating: prompt + "
        "--max-new-tokens): error refuses them, naming them; truncate scores their first tokens (when generating: "
        "stops generating at the context)", choices=OVERLONG))
    overwrite: bool = field(default=False, metadata=cli(
        "start over: drift discards the interrupted run in --out (without it, such a run is never discarded); "
        "generate replaces an existing (finished) OUT", cosmetic=True))
    progress: bool | None = field(default=None, metadata=cli(
        "progress bars on stderr (default: drift on; generate when stderr is a terminal)", cosmetic=True))


@dataclass
class GenerationOptions(ModelOptions, PromptOptions, ThinkingOptions, EngineOptions):
    """Everything `driftscope.generate` takes besides the sampling: the model, prompt and engine parts, and how the
    engine cuts its work (drift's and eval's step is their --max-batch-tokens)."""

    block_size: int | None = field(default=None, metadata=cli(
        "tokens per KV cache block (default: the engine's)", ge=1, cosmetic=True))
    max_step_tokens: int = field(default=8192, metadata=cli(
        "tokens computed in one engine step at most", ge=1, cosmetic=True))

    def __post_init__(self) -> None:
        self.resolve_model()
        check_ranges(type(self), vars(self))  # every number and choice, named with its flag
        PromptOptions.__post_init__(self)


@dataclass
class LMOptions(ModelOptions, ThinkingOptions, EngineOptions, BatchOptions, SeedOptions):
    """The options of lm-eval's `driftscope` model (its model_args, besides pretrained and gen_cache)."""

    def __post_init__(self) -> None:
        check_ranges(type(self), vars(self))
