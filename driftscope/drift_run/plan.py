"""The plan of a drift run: every check that needs no weights, run once, before any checkpoint loads.

Paths exist (and --out can be made), tokenizers agree (vocabulary, then encodings of the run's texts), configs are
compatible, every record tokenizes and fits the models' context, every token id has an embedding row, paper-mode PCA
has its queries.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from driftscope.drift_run import gen_drift
from driftscope.drift_run.options import DriftOptions
from driftscope.drift_run.paper_pca import query_texts
from driftscope.engine.checkpoint import Checkpoint, lora_mode
from driftscope.engine.config import ModelConfig
from driftscope.engine.data import (PackedBatch, Sample, fit_context, fit_prompts, next_fit, pack_batches,
                                    tokenize_records)
from driftscope.engine.model import Transformer
from driftscope.engine.runner import check_compatible_configs
from driftscope.engine.tokenizer import Tokenizer
from driftscope.errors import InputError
from driftscope.probes.lens import lens_indices
from driftscope.records import read_records, skipped
from driftscope.util import torch_dtype

log = logging.getLogger(__name__)
PathLike = str | Path
_TOKENIZER_CHECK_RECORDS = 64  # records per task whose texts must encode alike under base and tuned tokenizers


@dataclass
class Task:
    """One records file. Only the token ids are kept: each PackedBatch (4x the ids' memory in masks, targets,
    positions) is built when it runs."""
    name: str
    path: Path
    groups: list[list[Sample]]  # the samples of each token-budget batch, in pack_batches' order
    problems: list[str]
    check_texts: list[str]  # a sample of the texts, for the tokenizer agreement check
    max_batch_tokens: int
    prompts: list[gen_drift.PromptItem] | None = None  # generate mode: the prompts (groups is empty)
    queries: list[str] | None = None  # paper-mode PCA: the selected query texts

    def __len__(self) -> int:
        return len(self.groups)

    def n_chunks(self, size: int) -> int:
        return -(-len(self.prompts) // size)

    def max_id(self) -> int:
        if self.prompts is not None:
            return max(max(p.ids) for p in self.prompts)
        return max(int(s.input_ids.max()) for g in self.groups for s in g)

    def n_tokens(self, i: int) -> int:
        return sum(len(s.input_ids) for s in self.groups[i])

    def batch(self, i: int) -> PackedBatch:
        (b,) = pack_batches(self.groups[i], self.max_batch_tokens)
        return b


@dataclass
class Plan:
    base_dir: Path  # the base checkpoint's path (a folder or a .gguf file)
    tuned_dirs: dict[str, Path]  # label -> each tuned checkpoint's path
    data: dict[str, Path]
    opts: DriftOptions
    tok: Tokenizer
    configs: list[ModelConfig]  # base first
    tasks: list[Task]
    tokenizers: dict[str, str]  # tuned model -> the tokenizer it is read with (summary.json says it)
    base: Checkpoint | None = None
    tuned: dict[str, Checkpoint] = field(default_factory=dict)  # label -> checkpoint, as tuned_dirs
    lora: str = "merge"  # how the LoRA adapters among `tuned` apply: "merge" or "side" (checkpoint.lora_mode)


def _batch_groups(samples: Sequence[Sample], budget: int) -> list[list[Sample]]:
    """pack_batches' next-fit grouping (sample-id order), without building the batches."""
    ordered = sorted(samples, key=lambda s: s.sample_id)
    return [[ordered[i] for i in g] for g in next_fit([len(s.input_ids) for s in ordered], budget)]


def as_list(x: PathLike | Sequence[PathLike]) -> list[Path]:
    return [Path(x)] if isinstance(x, (str, Path)) else [Path(p) for p in x]


def unique_names(paths: list[Path], key) -> dict[str, Path]:
    """name -> path with names from `key(path)`, made unique with -2, -3 suffixes (in order)."""
    out: dict[str, Path] = {}
    for p in paths:
        name, k = key(p), 2
        while name in out:
            name, k = f"{key(p)}-{k}", k + 1
        out[name] = p
    return out


def check_same_vocab(tok: Tokenizer, other: Tokenizer) -> None:
    a, b = tok.get_vocab(), other.get_vocab()
    if a == b:
        return
    only_a = sorted(set(a.items()) - set(b.items()), key=lambda kv: kv[1])[:3]
    only_b = sorted(set(b.items()) - set(a.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(
        f"the tokenizers of {tok.path} and {other.path} differ ({len(a)} vs {len(b)} entries); first "
        f"(token, id) only in the base: {only_a}, only in the tuned: {only_b}. Both models must share a tokenizer."
    )


def check_same_encoding(tok: Tokenizer, other: Tokenizer, texts: Sequence[str]) -> None:
    """Same vocabulary is not enough (other merges give other ids for the same text): `texts` must encode alike."""
    for t in texts:
        ea, eb = tok.encode(t), other.encode(t)
        if ea != eb:
            i = next((i for i, (x, y) in enumerate(zip(ea, eb)) if x != y), min(len(ea), len(eb)))
            raise ValueError(
                f"the tokenizers of {tok.path} and {other.path} have the same vocabulary but encode differently "
                f"(merges or pre-tokenizer differ): {t[:60]!r} gives {ea[i:i + 5]} vs {eb[i:i + 5]} at token {i}. "
                "Both models must share a tokenizer."
            )


def _context(configs: list[ModelConfig]) -> tuple[int, str]:
    """(the context every model takes, the config.json that sets it)."""
    c = min(configs, key=lambda c: c.max_position_embeddings)
    return c.max_position_embeddings, c.source


def _read_task(name: str, path: Path, tok: Tokenizer, o: DriftOptions, context: tuple[int, str]) -> Task:
    records, problems = read_records(path)
    samples = tokenize_records(records, tok, max_seq_len=o.max_seq_len, chat_template_kwargs=o.chat_template_kwargs,
                               problems=problems)
    samples = fit_context(samples, *context, o.overlong, problems)
    if not samples:
        raise InputError(f"{path}: no usable record ({skipped(problems) if problems else 'the file has no records'})")
    texts = [x for r in records[:_TOKENIZER_CHECK_RECORDS] for x in (r.prompt, r.response) if x]
    task = Task(name, path, _batch_groups(samples, o.max_batch_tokens), problems, texts, o.max_batch_tokens)
    if o.pca == "paper":
        kept = {s.sample_id for s in samples}  # a record skipped for its chat template is no query either
        task.queries = query_texts(o, tok, records=[r for r in records if r.index in kept])
    return task


def _read_prompt_task(name: str, path: Path, tok: Tokenizer, o: DriftOptions, context: tuple[int, str]) -> Task:
    items, problems = gen_drift.read_prompt_items(o, tok, path)
    skip = fit_prompts([(p.where, len(p.ids)) for p in items], o.max_new_tokens, *context, o.overlong, problems)
    items = [p for p in items if p.where not in skip]
    if not items:
        raise InputError(f"{path}: no usable prompt ({skipped(problems) if problems else 'the file has no records'})")
    texts = [p.text for p in items[:_TOKENIZER_CHECK_RECORDS] if p.text]
    task = Task(name, path, [], problems, texts, o.max_batch_tokens, prompts=items)
    if o.pca == "paper":
        task.queries = query_texts(o, tok, prompts=[p.text for p in items])
    return task


def _check_ids_fit(tasks: list[Task], tok: Tokenizer, configs: list[ModelConfig]) -> None:
    """Every token id must have an embedding row in every model: else name the id, file and checkpoint."""
    for task in tasks:
        top = task.max_id()
        for c in configs:
            if top >= c.vocab_size:
                raise ValueError(
                    f"{task.path}: token id {top} ({tok.id_to_token(top)!r}) from the tokenizer in {tok.path} "
                    f"has no row in {c.source} (vocab_size {c.vocab_size}); the tokenizer ({tok.vocab_size} ids) "
                    "does not belong to that checkpoint"
                )


def check_paths(base: Path, tuned: list[Path], data: list[Path]) -> tuple[Checkpoint, list[Checkpoint]]:
    """The checkpoints (each an HF folder, a GGUF file or an adapter over --base) and the records files exist, each
    given once."""
    base_ckpt = Checkpoint.open(base, "--base")
    if base_ckpt.kind == "lora":
        raise InputError(f"--base {base} is a LoRA adapter; the base must be a full checkpoint (its adapters go in "
                         "--tuned)")
    tuned_ckpts = [Checkpoint.open(t, "--tuned", base=base_ckpt) for t in tuned]
    for p in data:
        if p.is_dir():
            raise InputError(f"--data {p} is a directory; pass the JSONL/JSON/parquet file(s) in it")
        if not p.is_file():
            raise FileNotFoundError(f"--data: records file {p} does not exist")
    for flag, given in (("--tuned", tuned), ("--data", data)):  # the same run twice under a renamed label
        resolved = [p.resolve() for p in given]
        for p, r in zip(given, resolved):
            if (first := given[resolved.index(r)]) is not p:
                raise InputError(f"{flag} {p} is given twice" + (f" (as {first})" if str(first) != str(p) else "")
                                 + f": give each {'checkpoint' if flag == '--tuned' else 'records file'} once")
    return base_ckpt, tuned_ckpts


def check_out(out: Path) -> None:
    """The output folder `out` is a folder or can be made one: neither it nor a folder above it is a file."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; the output folder must be a folder or not exist yet")
    below = next((p for p in out.parents if p.exists()), None)
    if below is not None and not below.is_dir():
        raise InputError(f"--out {out} lies below the file {below}; the output folder must be a folder or not "
                         "exist yet")


def _own_tokenizer(base: Checkpoint, tuned: Checkpoint) -> bool:
    """Whether `tuned` has a tokenizer of its own to check against the base's: none, or a byte-identical copy (the
    usual case; loading and comparing a 151k-entry tokenizer costs ~1 s), needs no check."""
    if tuned.tokenizer_file() is None:
        return False
    b, f = base.tokenizer_file(), tuned.tokenizer_file()
    return not (b is not None and b.stat().st_size == f.stat().st_size and base.tokenizer_digest() ==
                tuned.tokenizer_digest())


def _model_bytes(config: ModelConfig, dtype: str) -> int:
    n = sum(p.numel() for p in Transformer(config, device="meta").parameters())
    return n * torch.empty((), dtype=torch_dtype(dtype)).element_size()


def plan(base: PathLike, tuned: PathLike | Sequence[PathLike], data: PathLike | Sequence[PathLike],
         opts: DriftOptions, out: PathLike | None = None) -> Plan:
    """Check everything that can be checked without weights, each once; the tasks come back tokenized."""
    base_dir = Path(base)
    base_ckpt, tuned_list = check_paths(base_dir, as_list(tuned), as_list(data))
    if out is not None:
        check_out(Path(out))
    by_path = {c.path: c for c in tuned_list}
    tuned_dirs = unique_names([c.path for c in tuned_list], key=lambda p: by_path[p].name)
    ckpts = {k: by_path[p] for k, p in tuned_dirs.items()}
    opts.model_devices(len(tuned_dirs))  # a device per model, or one for all
    data_map = unique_names(as_list(data), key=lambda p: p.stem)
    if base_ckpt.tokenizer_file() is None:
        raise FileNotFoundError(f"--base {base_dir}: no tokenizer.json in that folder; drift reads its records with "
                                "the base's tokenizer")
    tok = base_ckpt.tokenizer()
    tokenizers = {k: str(c.tokenizer_file()) for k, c in ckpts.items() if c.tokenizer_file() is not None}
    for k, c in ckpts.items():
        if k not in tokenizers:
            tokenizers[k] = f"base's ({c.path} has no tokenizer.json)"
            if c.kind != "lora":  # an adapter without one is the usual case: it has its base's
                log.warning("--tuned %s has no tokenizer.json: its texts are read with the base's (%s)", c.path,
                            base_ckpt.tokenizer_file())
    others = [c.tokenizer() for c in ckpts.values() if _own_tokenizer(base_ckpt, c)]
    for other in others:  # vocabularies first: fail before the records are tokenized
        check_same_vocab(tok, other)
    configs = [base_ckpt.config(), *(c.config() for c in ckpts.values())]
    check_compatible_configs(configs[0], configs[1:])
    lens_indices(opts.lens, configs[0].num_layers + 1)  # an index beyond the model: refused before weights load
    adapters = [c for c in ckpts.values() if c.kind == "lora"]
    for c in adapters:  # every adapter read and checked against the base before any weights load
        c.adapter(configs[0], allow_pickle=opts.allow_pickle)
    if adapters and opts.stream_layers:
        raise InputError(f"--tuned {adapters[0].path} is a LoRA adapter: it needs the base's layers in memory; drop "
                         "--stream-layers")
    base_dev, tuned_devs = opts.model_devices(len(ckpts))
    for c, dev in zip(ckpts.values(), tuned_devs):
        if c.kind == "lora" and dev != base_dev:
            raise InputError(f"--tuned {c.path} is a LoRA adapter: it runs on the base's device {base_dev}, not "
                             f"{dev} (--tuned-device)")
    mode = lora_mode(opts.lora, adapters, _model_bytes(configs[0], opts.dtype), base_dev)
    read = _read_prompt_task if opts.generate else _read_task
    tasks = [read(name, path, tok, opts, _context(configs)) for name, path in data_map.items()]
    _check_ids_fit(tasks, tok, configs)
    for task in [t for t in tasks if t.queries is not None]:
        n, src = len(task.queries), opts.pca_texts or task.path
        if n < 2:
            raise InputError(f"{src}: paper-mode PCA needs at least 2 query texts, found {n}")
        if n < opts.pca_queries:
            raise InputError(f"pca_queries={opts.pca_queries}: {src} has only {n} query texts; pass --pca-queries "
                             f"{n} or fewer")
    texts = [x for t in tasks for x in t.check_texts]
    for other in others:
        check_same_encoding(tok, other, texts)
    return Plan(base_dir, tuned_dirs, data_map, opts, tok, configs, tasks, tokenizers, base_ckpt, ckpts, mode)
