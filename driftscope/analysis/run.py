"""`drift(base, tuned, data, out=None, **options)`: the lockstep drift analysis, end to end.

Records -> packed token-budget batches -> base and tuned models in lockstep -> probes (token metrics, shifted
tokens, per-layer similarity, PCA) -> summary.json, token table, pca_shift.json, report.html. Resumable.
With `generate=True` the records give only prompts: each tuned model generates, the base follows (gen_drift.py).
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from driftscope.analysis.checkpoint import RunState
from driftscope.analysis import gen_drift
from driftscope.analysis.env import GpuTelemetry, Progress, machine, versions
from driftscope.analysis.options import DriftOptions, fingerprint
from driftscope.analysis.paper_pca import paper_pca, query_texts
from driftscope.analysis.shared_pca import TunedMeans, shared_streaming_finalize
from driftscope.analysis.summary import generation_summary, model_summary, task_summary
from driftscope.engine.data import PackedBatch, Record, Sample, next_fit, pack_batches, read_records, tokenize_records
from driftscope.engine.loader import load_model
from driftscope.engine.config import ModelConfig
from driftscope.engine.runner import LockstepRunner, check_compatible_configs
from driftscope.engine.tokenizer import Tokenizer, load_tokenizer
from driftscope.kernels import backend_status
from driftscope.kernels.vocab_probe import vocab_probe
from driftscope.probes import HiddenSimilarity, PaperPCAShift, ShiftedTokens, StreamingPCA, TokenMetrics
from driftscope.probes.base import Accumulator

log = logging.getLogger(__name__)
PathLike = str | Path
_TOKENIZER_CHECK_RECORDS = 64  # records per task whose texts must encode alike under base and tuned tokenizers


@dataclass
class DriftReport:
    """`.summary` is exactly what summary.json holds; `.files` maps output kinds to their paths."""

    summary: dict
    out: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    responses: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # generate mode: model -> task -> records


@dataclass
class _Task:
    """One records file. Only the token ids are kept: each PackedBatch (4x the ids' memory in masks, targets,
    positions) is built when it runs, and the records themselves only when paper-mode PCA needs their prompts."""
    name: str
    path: Path
    groups: list[list[Sample]]  # the samples of each token-budget batch, in pack_batches' order
    problems: list[str]
    records: list[Record]
    max_batch_tokens: int
    prompts: list[gen_drift.PromptItem] | None = None  # generate mode: the prompts (groups is empty)

    def __len__(self) -> int:
        return len(self.groups)

    def n_chunks(self, size: int) -> int:
        return -(-len(self.prompts) // size)

    def max_id(self) -> int:
        if self.prompts is not None:
            return max(max(p.ids) for p in self.prompts)
        return max(int(s.input_ids.max()) for g in self.groups for s in g)

    def sample_texts(self, n: int) -> list[str]:
        """Texts of the first n records, for the tokenizer agreement check."""
        if self.prompts is not None:
            return [p.text for p in self.prompts[:n] if p.text]
        return [x for r in self.records[:n] for x in (r.prompt, r.response) if x]

    def n_tokens(self, i: int) -> int:
        return sum(len(s.input_ids) for s in self.groups[i])

    def batch(self, i: int) -> PackedBatch:
        (b,) = pack_batches(self.groups[i], self.max_batch_tokens)
        return b


def _batch_groups(samples: Sequence[Sample], budget: int) -> list[list[Sample]]:
    """pack_batches' next-fit grouping (sample-id order), without building the batches."""
    ordered = sorted(samples, key=lambda s: s.sample_id)
    return [[ordered[i] for i in g] for g in next_fit([len(s.input_ids) for s in ordered], budget)]


def _as_list(x: PathLike | Sequence[PathLike]) -> list[Path]:
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


def check_same_tokenizer(tok: Tokenizer, other_dir: Path, texts: Sequence[str] = ()) -> None:
    """Both models must tokenize identically; say what differs if not (a tuned dir without tokenizer.json is fine).

    Same vocabulary is not enough (different merges give other ids for the same text with the same vocabulary):
    `texts` (a sample of the run's records) must also encode to the same ids."""
    if not (other_dir / "tokenizer.json").is_file():
        return
    other = load_tokenizer(other_dir)
    a, b = tok.get_vocab(), other.get_vocab()
    if a == b:
        for t in texts:
            ea, eb = tok.encode(t), other.encode(t)
            if ea != eb:
                i = next((i for i, (x, y) in enumerate(zip(ea, eb)) if x != y), min(len(ea), len(eb)))
                raise ValueError(
                    f"the tokenizers of {tok.path} and {other_dir} have the same vocabulary but encode differently "
                    f"(merges or pre-tokenizer differ): {t[:60]!r} gives {ea[i:i + 5]} vs {eb[i:i + 5]} at token {i}. "
                    "Both models must share a tokenizer."
                )
        return
    only_a = sorted(set(a.items()) - set(b.items()), key=lambda kv: kv[1])[:3]
    only_b = sorted(set(b.items()) - set(a.items()), key=lambda kv: kv[1])[:3]
    raise ValueError(
        f"the tokenizers of {tok.path} and {other_dir} differ ({len(a)} vs {len(b)} entries); first "
        f"(token, id) only in the base: {only_a}, only in the tuned: {only_b}. Both models must share a tokenizer."
    )


def _valid_vocab(base, tuned, tok: Tokenizer) -> int | None:
    """The vocab_probe `valid_vocab` of one (base, tuned) pair: None when their heads have the same rows (the
    whole vocabulary), else the tokenizer's id space (resized heads). Per pair, so a model's numbers never
    depend on which other tuned models share the run."""
    return None if base.lm_head_weight.shape[0] == tuned.lm_head_weight.shape[0] else tok.vocab_size


def _finite(obj):
    """`obj` with every non-finite float (NaN, ±inf) replaced by None: summary.json is strict JSON, and
    DriftReport.summary must be what is on disk (a diverged checkpoint gives NaN states, not a crash at the end)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class _Run:
    def __init__(self, base_dir: Path, tuned: dict[str, Path], data: dict[str, Path], out: Path | None, opts: DriftOptions):
        self.opts, self.out = opts, out
        self.base_dir, self.tuned_dirs, self.data = base_dir, tuned, data
        self.device = torch.device(opts.device)
        self.tok = load_tokenizer(base_dir)
        for d in tuned.values():
            check_same_tokenizer(self.tok, d)  # vocabularies first: fail before the checkpoints load
        # configs, data and tokenizers first: what cannot work is refused before minutes of weight loading
        configs = [ModelConfig.from_file(d / "config.json") for d in (base_dir, *tuned.values())]
        check_compatible_configs(configs[0], configs[1:])
        self.tasks = [(self._read_prompt_task if opts.generate else self._read_task)(name, path)
                      for name, path in data.items()]
        self._check_ids_fit_the_models(configs)
        if opts.pca == "paper":  # the query count is known now: refuse before the weights load and the batches run
            for task in self.tasks:
                if len(query_texts(self, task)) < 2:
                    raise ValueError(f"{opts.pca_texts or task.path}: paper-mode PCA needs at least 2 query texts, "
                                     f"found {len(query_texts(self, task))}")
        sample = [x for t in self.tasks for x in t.sample_texts(_TOKENIZER_CHECK_RECORDS)]
        for d in tuned.values():
            check_same_tokenizer(self.tok, d, sample)
        kw = {"device": self.device, "dtype": opts.dtype, "allow_pickle": opts.allow_pickle}
        self.base = load_model(base_dir, **kw)
        self.tuned = [load_model(d, **kw) for d in tuned.values()]
        self.runner = LockstepRunner(self.base, self.tuned)
        self.valid_vocab = [_valid_vocab(self.base, t, self.tok) for t in self.tuned]
        self.accs: dict[str, Accumulator] = {}
        self.gen_rows: dict[tuple[int, int], list[dict]] = {}  # generate mode: responses per (tuned model, task)
        self.tokens_generated = 0
        for j in range(len(self.tuned)):
            for k, task in enumerate(self.tasks):
                for kind, acc in self._new_accumulators(j).items():
                    self.accs[f"m{j}.t{k}.{kind}"] = acc

    def _check_ids_fit_the_models(self, configs: list[ModelConfig]) -> None:
        """Every token id must have an embedding row in every model: else say which id, file and checkpoint
        (not an IndexError from the embedding lookup in the middle of the run)."""
        for task in self.tasks:
            top = task.max_id()
            for c in configs:
                if top >= c.vocab_size:
                    raise ValueError(
                        f"{task.path}: token id {top} ({self.tok.id_to_token(top)!r}) from the tokenizer in {self.tok.path} "
                        f"has no row in {c.source} (vocab_size {c.vocab_size}); the tokenizer ({self.tok.vocab_size} ids) "
                        "does not belong to that checkpoint"
                    )

    def _read_task(self, name: str, path: Path) -> _Task:
        o = self.opts
        records, problems = read_records(path)
        samples = tokenize_records(records, self.tok, max_seq_len=o.max_seq_len,
                                   chat_template_kwargs=o.chat_template_kwargs, problems=problems)
        if not samples:
            first = problems[0] if problems else "the file has no records"
            raise ValueError(f"{path}: no usable record ({len(problems)} problems; first: {first})")
        keep = records if o.pca == "paper" and o.pca_texts is None else records[:_TOKENIZER_CHECK_RECORDS]
        return _Task(name, path, _batch_groups(samples, o.max_batch_tokens), problems, keep, o.max_batch_tokens)

    def _read_prompt_task(self, name: str, path: Path) -> _Task:
        items, problems = gen_drift.read_prompt_items(self, path)
        if not items:
            first = problems[0] if problems else "the file has no records"
            raise ValueError(f"{path}: no usable prompt ({len(problems)} problems; first: {first})")
        return _Task(name, path, [], problems, [], self.opts.max_batch_tokens, prompts=items)

    def _new_accumulators(self, j: int) -> dict[str, Accumulator]:
        c = self.base.config
        n_states = c.num_layers + 1
        accs: dict[str, Accumulator] = {
            "tokens": TokenMetrics(),
            "shifted": ShiftedTokens(max(self.base.lm_head_weight.shape[0], *(t.lm_head_weight.shape[0] for t in self.tuned))),
            "hidden": HiddenSimilarity(n_states, c.hidden_size, cka=self.opts.cka_mode(c.hidden_size),
                                       proj_dim=self.opts.cka_proj_dim),
        }
        if self.opts.pca == "streaming" and self.opts.generate:  # each tuned model's own tokens: base moments each
            accs["pca"] = StreamingPCA(n_states, c.hidden_size)
        elif self.opts.pca == "streaming":  # base moments once per task (model 0's), tuned means per model
            accs["pca"] = StreamingPCA(n_states, c.hidden_size) if j == 0 else TunedMeans(n_states, c.hidden_size)
        elif self.opts.pca == "paper":
            accs["pca"] = PaperPCAShift(n_states, c.hidden_size)
        return accs

    def acc(self, j: int, k: int, kind: str) -> Accumulator:
        return self.accs[f"m{j}.t{k}.{kind}"]

    # ---- one batch ------------------------------------------------------------------------------------------
    def process(self, k: int, batch: PackedBatch) -> None:
        dev = self.device
        mask = batch.score_mask.to(dev)
        streaming = self.opts.pca == "streaming"

        def on_layer(i: int, hb: torch.Tensor, hts: list[torch.Tensor]) -> None:
            hb_s = hb[mask]  # [N, d] scored positions
            for j, ht in enumerate(hts):
                ht_s = ht[mask]
                self.acc(j, k, "hidden").update(i, hb_s, ht_s)
                if streaming and j == 0:
                    self.acc(j, k, "pca").update(i, hb_s, ht_s)
                elif streaming:
                    self.acc(j, k, "pca").update(i, ht_s)

        hb, hts = self.runner.forward(batch.input_ids, batch.cu_seqlens, on_layer)
        targets = batch.scored_targets.to(dev)
        hb_s = hb[mask]
        for j, (ht, model) in enumerate(zip(hts, self.tuned)):
            r = vocab_probe(hb_s, self.base.lm_head_weight, ht[mask], model.lm_head_weight, targets,
                            valid_vocab=self.valid_vocab[j])
            self.acc(j, k, "tokens").update(r, batch.scored_sample_ids, batch.scored_first)
            self.acc(j, k, "shifted").update(targets, r.rank_base, r.rank_tuned)

    # ---- the loop with checkpoints ------------------------------------------------------------------------------
    def run(self) -> dict:
        o = self.opts
        state = RunState(self.out) if self.out is not None else None
        fp = fingerprint(self.base_dir, self.tuned_dirs, self.data, o)
        progress = {"fingerprint": fp, "done": {}, "pca_done": [], "generation": 0, "gen_done": {}, "gen_rows": {}}
        if state is not None:
            if o.resume and state.exists():
                progress = state.load_progress(fp)
                state.restore(progress, self.accs)
                for (j, k) in ((j, k) for j in range(len(self.tuned)) for k in range(len(self.tasks))):
                    n = progress.get("gen_rows", {}).get(f"m{j}.t{k}", 0)
                    if n:
                        self.gen_rows[(j, k)] = state.load_rows(f"m{j}.t{k}", n)
                log.info("resuming from %s: %s", state.dir, progress["done"] or progress.get("gen_done"))
            else:
                state.reset()
                state.save(progress, self.accs)  # the fingerprint is on disk before any batch: resume can check it
        telemetry = GpuTelemetry(self.device)
        telemetry.sample()
        if o.generate:  # progress in sequences: every prompt once per tuned model
            total = sum(len(t.prompts) for t in self.tasks) * len(self.tuned)
            done_units = sum(min(progress["gen_done"].get(f"m{j}.t{k}", 0) * o.generate_chunk, len(t.prompts))
                             for j in range(len(self.tuned)) for k, t in enumerate(self.tasks))
        else:
            total = sum(t.n_tokens(i) for t in self.tasks for i in range(len(t)))
            done_units = sum(t.n_tokens(i) for t in self.tasks for i in range(progress["done"].get(t.name, 0)))
        bar = Progress(total, "drift", enabled=o.progress, unit="seq" if o.generate else "tok")
        bar.advance(done_units)
        last_save, save_cost = time.monotonic(), 0.0
        t0 = time.perf_counter()
        # True while the accumulators may hold part of a batch that progress does not count: an interrupt then
        # must not save them (the resumed run would add that batch again); the last checkpoint stays valid.
        in_batch = False

        def maybe_save() -> None:
            # at most every checkpoint_every s, and never more than ~10% of the time in saving (a d=5120
            # streaming-PCA state is GBs); checkpoint_every=0 means after every batch, as asked
            nonlocal last_save, save_cost
            gap = max(o.checkpoint_every, 9 * save_cost) if o.checkpoint_every > 0 else 0.0
            if state is not None and time.monotonic() - last_save >= gap:
                t_save = time.monotonic()
                state.save(progress, self.accs)
                last_save = time.monotonic()
                save_cost = last_save - t_save

        try:
            for k, task in enumerate(self.tasks):
                for j in range(len(self.tuned)) if o.generate else ():
                    key = f"m{j}.t{k}"
                    for c in range(progress["gen_done"].get(key, 0), task.n_chunks(o.generate_chunk)):
                        in_batch = True
                        rows = gen_drift.generate_chunk(self, j, k, task, c)
                        self.gen_rows.setdefault((j, k), []).extend(rows)
                        if state is not None:
                            state.append_rows(key, rows)
                        progress["gen_done"][key] = c + 1
                        progress["gen_rows"][key] = len(self.gen_rows[(j, k)])
                        in_batch = False
                        bar.advance(len(rows))
                        maybe_save()
                start = progress["done"].get(task.name, 0)
                for bi in range(start, len(task)):
                    in_batch = True
                    batch = task.batch(bi)
                    self.process(k, batch)
                    progress["done"][task.name] = bi + 1
                    in_batch = False
                    bar.advance(batch.n_tokens)
                    maybe_save()
                if o.pca == "paper" and task.name not in progress["pca_done"]:
                    paper_pca(self, k, task)
                    progress["pca_done"].append(task.name)
                    if state is not None:  # the PCA phase is a unit of work of its own: keep it
                        state.save(progress, self.accs)
                        last_save = time.monotonic()
        except KeyboardInterrupt:
            if state is not None and not in_batch:
                state.save(progress, self.accs)
                log.warning("interrupted: state saved in %s; rerun with --resume to continue", state.dir)
            elif state is not None:
                log.warning("interrupted inside a batch: %s keeps the last checkpoint (%s); rerun with --resume "
                            "to continue from there", state.dir,
                            "none yet" if not state.exists() else "saved after a complete batch")
            raise
        finally:
            bar.close()
        telemetry.sample()
        seconds = time.perf_counter() - t0
        tokens_run = self.tokens_generated if o.generate else total - done_units
        return self.summarize(seconds, tokens_run, telemetry)

    def summarize(self, seconds: float, tokens_run: int, telemetry: GpuTelemetry) -> dict:
        models = {}
        pcas: dict[tuple[int, int], dict | None] = {}
        for k in range(len(self.tasks)):
            if self.opts.pca == "streaming" and self.opts.generate:  # each tuned model with its own base moments
                pcas.update({(j, k): shared_streaming_finalize(self.acc(j, k, "pca"), [])[0]
                             for j in range(len(self.tuned))})
            elif self.opts.pca == "streaming":
                others = [self.acc(j, k, "pca") for j in range(1, len(self.tuned))]
                pcas.update({(j, k): r for j, r in enumerate(shared_streaming_finalize(self.acc(0, k, "pca"), others))})
            else:
                pcas.update({(j, k): self.acc(j, k, "pca").finalize() if self.opts.pca == "paper" else None
                             for j in range(len(self.tuned))})
        for j, name in enumerate(self.tuned_dirs):
            tasks = {}
            for k, task in enumerate(self.tasks):
                pca = pcas[(j, k)]
                tasks[task.name] = task_summary(
                    tokens=self.acc(j, k, "tokens").finalize(),
                    hidden=self.acc(j, k, "hidden").finalize(),
                    shifted=self.acc(j, k, "shifted").finalize(decode=self._decode, top_k=self.opts.top_tokens),
                    pca=pca, problems=task.problems,
                )
                if self.opts.generate:
                    tasks[task.name]["generation"] = generation_summary(self.gen_rows.get((j, k), []))
            models[name] = model_summary(str(self.tuned_dirs[name]), tasks)
        return _finite({
            "driftscope_version": versions()["driftscope"],
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "config": {
                "base": str(self.base_dir), "tuned": {k: str(v) for k, v in self.tuned_dirs.items()},
                "data": {k: str(v) for k, v in self.data.items()}, **self.opts.as_dict(),
                "valid_vocab": dict(zip(self.tuned_dirs, self.valid_vocab)),
            },
            "versions": versions(), "machine": machine(self.device), "backends": backend_status(),
            "gpu_telemetry": telemetry.summary(),
            "timing": {"seconds": seconds, "tokens": tokens_run, "tokens_per_s": tokens_run / seconds if seconds else None},
            "models": models,
        })

    def responses(self) -> dict[str, dict[str, list[dict]]]:
        """Generate mode: model -> task -> response records in the paper's format (input = the rendered prompt)."""
        out: dict[str, dict[str, list[dict]]] = {}
        for j, name in enumerate(self.tuned_dirs):
            for k, task in enumerate(self.tasks):
                text = {p.index: p for p in task.prompts}
                rows = []
                for r in sorted(self.gen_rows.get((j, k), []), key=lambda r: r["index"]):
                    p = text[r["index"]]
                    rows.append({"input": p.text if p.text is not None else self.tok.decode(p.ids), **r})
                out.setdefault(name, {})[task.name] = rows
        return out

    def _decode(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def shifted_rows(self) -> list[dict]:
        """Every shifted token of every (model, task), for the token table file."""
        rows = []
        for j, name in enumerate(self.tuned_dirs):
            for k, task in enumerate(self.tasks):
                top = self.acc(j, k, "shifted").finalize(decode=self._decode, top_k=None)["top"]
                rows.extend({"model": name, "task": task.name, **r} for r in top)
        return rows


def drift(
    base: PathLike, tuned: PathLike | Sequence[PathLike], data: PathLike | Sequence[PathLike],
    out: PathLike | None = None, **options,
) -> DriftReport:
    """Compare `base` with each tuned checkpoint on each records file; see DriftOptions for the options.

    With `out`, writes summary.json, tokens.{parquet,jsonl}, pca_shift.json and report.html there and keeps a
    resumable state while running (`resume=True` continues an interrupted run). Returns a DriftReport.
    """
    opts = DriftOptions(**options)
    base_dir = Path(base)
    for p in [base_dir, *_as_list(tuned)]:
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint folder {p} does not exist")
    for p in _as_list(data):
        if p.is_dir():
            raise IsADirectoryError(f"records file {p} is a directory; pass the JSONL/JSON/parquet file(s) in it")
        if not p.is_file():
            raise FileNotFoundError(f"records file {p} does not exist")
    tuned_map = unique_names(_as_list(tuned), key=lambda p: p.resolve().name)
    data_map = unique_names(_as_list(data), key=lambda p: p.stem)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(base_dir, tuned_map, data_map, out_dir, opts)
    summary = run.run()
    report = DriftReport(summary=summary, out=out_dir, responses=run.responses() if opts.generate else {})
    if out_dir is not None:
        from driftscope.analysis.outputs import write_outputs, write_responses

        report.files = write_outputs(out_dir, summary, run.shifted_rows())
        if opts.generate:
            report.files.update(write_responses(out_dir, report.responses))
        RunState(out_dir).remove()
    return report
