"""`drift(base, tuned, data, out=None, **options)`: the lockstep drift analysis, end to end.

plan (every check, no weights: plan.py) -> load -> loop over packed token-budget batches, base and tuned models in
lockstep, probes per task (bundle.py), checkpoints -> summary.json, token table, pca_shift.json, report.html.
With `generate=True` the records give only prompts: each tuned model generates, the base follows (gen_drift.py).
"""
from __future__ import annotations

import datetime as _dt
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from driftscope.drift_run import gen_drift
from driftscope.drift_run.bundle import TaskProbes, merge_kind
from driftscope.drift_run.checkpoint import Checkpointer, RunState, disk_error
from driftscope.distributed import World
from driftscope.telemetry import GpuTelemetry, Progress, StageTimes, machine, note, process_seconds, versions
from driftscope.drift_run.options import DriftOptions, fingerprint
from driftscope.drift_run.paper_pca import paper_pca
from driftscope.drift_run.plan import Plan, plan
from driftscope.drift_run.summary import generation_summary, mark_nonfinite, model_summary
from driftscope.cli_options import options_doc
from driftscope.engine.data import PackedBatch, share_prefix
from driftscope.errors import Terminated
from driftscope.engine.runner import LockstepRunner
from driftscope.kernels import backend_status
from driftscope.kernels.vocab_probe import vocab_probe
from driftscope.kernels.scratch import release_scratch
from driftscope.kernels.vocab_probe.reference import release_workspace
from driftscope.util import strict_json
from driftscope.probes.lens import LensHeads

log = logging.getLogger(__name__)
PathLike = str | Path


@dataclass
class DriftReport:
    """`.summary` is exactly what summary.json holds; `.files` maps output kinds to their paths."""

    summary: dict
    out: Path | None
    files: dict[str, Path] = field(default_factory=dict)
    responses: dict[str, dict[str, list[dict]]] = field(default_factory=dict)  # generate mode: model -> task -> records


def _valid_vocab(base, tuned, tok) -> int | None:
    """The vocab_probe `valid_vocab` of one (base, tuned) pair: None when their heads have the same rows (the
    whole vocabulary), else the tokenizer's id space (resized heads). Per pair, so a model's numbers never
    depend on which other tuned models share the run."""
    return None if base.lm_head_weight.shape[0] == tuned.lm_head_weight.shape[0] else tok.vocab_size


class _Run:
    """One planned run: load the models, loop over the batches with checkpoints, summarize."""

    def __init__(self, p: Plan, out: Path | None, times: StageTimes):
        self.plan, self.opts, self.out, self.tok, self.tasks = p, p.opts, out, p.tok, p.tasks
        base_dev, tuned_devs = p.opts.model_devices(len(p.tuned_dirs))
        self.device = torch.device(base_dev)  # the base's: the probes run there
        self.times = times
        self._finished: dict | None = None  # the progress of a run whose loop ended (see keep_finished)
        self._ckpt: Checkpointer | None = None
        kw = {"dtype": p.opts.dtype, "allow_pickle": p.opts.allow_pickle, "stream_layers": p.opts.stream_layers}
        n, where = len(p.tuned_dirs), ", ".join(dict.fromkeys([base_dev, *tuned_devs]))
        note(f"loading base + {n} tuned model{'s' * (n > 1)} ({p.opts.dtype} on {where}"
             f"{', layers streamed' if p.opts.stream_layers else ''}) ...", p.opts.progress)
        with times("load"):
            self.base = p.base.load(self.device, **kw)
            self.tuned = [c.load(dev, **kw, base_model=self.base, lora_mode=p.lora)
                          for c, dev in zip(p.tuned.values(), tuned_devs)]
            for t in self.tuned:  # the vocab probe runs on the base's device, beside the tuned final states
                t.place_head(self.device)
        self.runner = LockstepRunner(self.base, self.tuned)
        self.valid_vocab = [_valid_vocab(self.base, t, self.tok) for t in self.tuned]
        self.vocab_groups: dict[int | None, list[int]] = {}  # valid_vocab -> the tuned models probed with it
        for j, vv in enumerate(self.valid_vocab):
            self.vocab_groups.setdefault(vv, []).append(j)
        c, o = self.base.config, self.opts
        vocab_rows = max(m.lm_head_weight.shape[0] for m in (self.base, *self.tuned))
        lens = LensHeads.of_models(o.lens, self.base, self.tuned, self.valid_vocab, o.lens_top_k)
        self.probes = [TaskProbes(len(self.tuned), c.num_layers + 1, c.hidden_size, vocab_rows=vocab_rows,
                                  pca=o.pca, cka=o.cka_mode(c.hidden_size), cka_proj_dim=o.cka_proj_dim,
                                  shared_base=not o.generate, lens=lens, examples=o.examples, times=times)
                       for _ in self.tasks]
        self.states = {f"t{k}": probes for k, probes in enumerate(self.probes)}
        self.gen_rows: dict[tuple[int, int], list[dict]] = {}  # generate mode: responses per (tuned model, task)
        self.tokens_generated = 0
        self.tokens_scored = 0  # by this process: the positions the probes score (generated tokens in generate mode)
        self.nonfinite: dict[str, int] = {}  # "m{j}.t{k}" -> scored tokens with NaN/Inf logits (kept in progress)

    # ---- the units of work: _chunk_units and _batch_units give (size, None when done before, else the work) -----
    def process(self, k: int, batch: PackedBatch) -> None:
        """One packed batch of task k through every model in lockstep, into task k's probes."""
        if self.opts.share_prefix and self.runner.can_share_prefix:  # the samples' common prefix once
            batch = share_prefix(batch)
        self.tokens_scored += int(batch.score_mask.sum())  # a CPU tensor: no device sync
        probes, times = self.probes[k], self.times

        rows = batch.score_mask.nonzero().squeeze(1).to(self.device)  # the rows of hb[mask], found on the CPU
        final = self.runner.n_states - 1

        def on_layer(i: int, hb: torch.Tensor, hts: list[torch.Tensor]) -> None:
            with times("layer_probes"):
                if i == final:  # the forward computed only the scored rows there
                    probes.on_layer(i, hb, hts)
                else:
                    probes.on_layer(i, hb.index_select(0, rows), [ht.index_select(0, rows) for ht in hts])

        with times("forward"):  # the final states of the scored positions, [N, d]
            hb_s, hts = self.runner.forward(batch.input_ids, batch.cu_seqlens, on_layer, rows, batch.prefix)
        targets = batch.scored_targets.to(self.device)
        bad: dict[int, torch.Tensor] = {}  # tuned model -> its scored tokens with non-finite logits, on the device
        outputs = None  # with the lens on, the output probe's results come from its calls (no GEMM of their own)
        if probes.lens is not None:
            with times("lens"):
                outputs = probes.outputs_from_lens(targets)
        for vv, js in self.vocab_groups.items():  # one call per valid_vocab: the base head's work once per group
            with times("vocab_probe"):
                rs = [outputs[j] for j in js] if outputs is not None else vocab_probe(
                    hb_s, self.base.lm_head_weight, [hts[j] for j in js],
                    [self.tuned[j].lm_head_weight for j in js], targets, valid_vocab=vv)
            with times("token_probes"):
                for j, r in zip(js, rs):
                    probes.on_vocab(j, r, targets, batch.scored_sample_ids, batch.scored_first)
                    bad[j] = (~torch.isfinite(torch.stack([r.kl_tb, r.kl_bt, r.lse_base, r.lse_tuned]))).any(0).sum()
        for j, n in zip(bad, torch.stack(list(bad.values())).tolist()):  # one device sync per batch
            if n:
                self.nonfinite[f"m{j}.t{k}"] = self.nonfinite.get(f"m{j}.t{k}", 0) + n

    def _chunk(self, k: int, chunk: int) -> list:
        size = self.opts.generate_chunk
        return self.tasks[k].prompts[chunk * size:(chunk + 1) * size]

    def generate(self, j: int, k: int, chunk: int) -> list[dict]:
        """Chunk `chunk` of task k's prompts generated by tuned model j, the base in lockstep."""
        with self.times("generate"):
            rows = gen_drift.generate_chunk(self.opts, self.base, self.tuned[j], j, self.tok, self._chunk(k, chunk),
                                            self.probes[k], self.valid_vocab[j])
        n = sum(len(r["output_token_ids"]) for r in rows)
        self.tokens_generated += n
        self.tokens_scored += n  # the probes score every generated token
        return rows

    def _chunk_units(self, k: int, progress: dict, state: RunState | None) -> Iterator[tuple[int, Callable | None]]:
        """Generate mode: task k's prompt chunks on this rank, by tuned model, sized in sequences; a chunk's work is
        `generate` and keeping its responses (in the state too)."""
        def unit(j: int, pos: int) -> None:
            rows = self.generate(j, k, self.gen_shards[(j, k)][pos])
            self.gen_rows.setdefault((j, k), []).extend(rows)
            if state is not None:
                state.append_rows(f"m{j}.t{k}", rows)
            progress["gen_done"][f"m{j}.t{k}"] = pos + 1
            progress["gen_rows"][f"m{j}.t{k}"] = len(self.gen_rows[(j, k)])

        for j in range(len(self.tuned)) if self.opts.generate else ():
            done = progress["gen_done"].get(f"m{j}.t{k}", 0)
            for pos, c in enumerate(self.gen_shards[(j, k)]):
                yield len(self._chunk(k, c)), None if pos < done else partial(unit, j, pos)

    def _batch_units(self, k: int, progress: dict) -> Iterator[tuple[int, Callable | None]]:
        """Task k's batches on this rank, sized in tokens; a batch's work is `process`."""
        task, done = self.tasks[k], progress["done"].get(self.tasks[k].name, 0)

        def unit(pos: int) -> None:
            self.process(k, task.batch(self.shards[k][pos]))
            progress["done"][task.name] = pos + 1

        for pos, i in enumerate(self.shards[k]):
            yield task.n_tokens(i), None if pos < done else partial(unit, pos)

    # ---- the loop with checkpoints ------------------------------------------------------------------------------
    def _restore(self, state: RunState | None, progress: dict) -> None:
        """Put a resumed run's probes, responses and counts back (nothing to do for a fresh run's progress)."""
        self.nonfinite = progress.setdefault("nonfinite", {})
        if state is None or not progress["generation"]:
            return
        state.restore(progress, self.states)
        for key, n in progress.get("gen_rows", {}).items():
            j, k = (int(x[1:]) for x in key.split("."))
            if n:
                self.gen_rows[(j, k)] = state.load_rows(key, n)
        log.info("resuming from %s: %s", state.dir, progress["done"] or progress.get("gen_done"))

    def run(self, progress: dict, world: World | None = None) -> dict | None:
        """Every unit of work not done in `progress` (a fresh run's, or the saved one of a resumed run), then the
        summary. The finished run's unsaved progress is saved only if the summary or the outputs fail (`keep_finished`,
        from drift()): a successful run does not write a state it deletes next (a second or more of float64 sums).
        Under torchrun (`world`), this rank's share of the batches, saved, then every rank's probes merged into rank
        0's: the summary there, None on the other ranks."""
        o, world, tasks = self.opts, world or World(), self.tasks
        state = RunState(self.out, world.rank, world.size) if self.out is not None else None
        # batches per task this process runs (all of them for one process); progress["done"] counts them
        self.shards = world.shard([[t.n_tokens(i) for i in range(len(t))] for t in tasks])
        # generate mode: the prompt chunks of each (tuned model, task) this process runs; progress["gen_done"] counts
        # them. A chunk costs its prompts' tokens plus max_new_tokens each (where EOS falls is not known before).
        pairs = [(j, k) for k in range(len(tasks)) for j in range(len(self.tuned))] if o.generate else []
        self.gen_shards = dict(zip(pairs, world.shard([
            [sum(len(it.ids) + o.max_new_tokens for it in self._chunk(k, c))
             for c in range(tasks[k].n_chunks(o.generate_chunk))] for _, k in pairs])))
        self._restore(state, progress)
        ckpt = self._ckpt = Checkpointer(state, self.states, o.checkpoint_every, self.times)
        telemetry = GpuTelemetry(self.device)
        telemetry.sample()
        units = [[*self._chunk_units(k, progress, state), *self._batch_units(k, progress)] for k in range(len(tasks))]
        last = next((work for task_units in reversed(units) for _, work in reversed(task_units) if work), None)
        total = sum(n for task_units in units for n, _ in task_units)
        done_units = sum(n for task_units in units for n, work in task_units if work is None)
        bar = Progress(total, "drift", enabled=o.progress, unit="seq" if o.generate else "tok", done=done_units)
        t0 = time.perf_counter()
        # True while the probes may hold part of a unit that progress does not count: an interrupt then must not
        # save them (the resumed run would add that unit again); the last checkpoint stays valid.
        in_unit = False
        try:
            for k, task in enumerate(tasks):
                for n, work in units[k]:
                    if work is not None:
                        in_unit = True
                        work()
                        in_unit = False
                        bar.advance(n)
                        ckpt.maybe_save(progress, final=work is last)
                if o.pca == "paper" and world.main and task.name not in progress["pca_done"]:  # rank 0 alone
                    with self.times("paper_pca"):
                        self.probes[k].set_paper_vectors(paper_pca(self.runner, self.tok, task.queries, o))
                    progress["pca_done"].append(task.name)
                    ckpt.save(progress)  # the PCA phase is a unit of work of its own: keep it
            self._finished = progress
            if world.size > 1:  # the merge below moves this rank's work into rank 0's: keep it first
                ckpt.flush(progress)
        except KeyboardInterrupt:
            if state is not None and not in_unit:
                state.save(progress, self.states)
                log.warning("interrupted: state saved in %s; rerun with --resume to continue", state.dir)
            elif state is not None:
                log.warning("interrupted inside a batch: %s keeps the last checkpoint (%s); rerun with --resume "
                            "to continue from there", state.dir,
                            "none yet" if not state.exists() else "saved after a complete batch")
            raise
        finally:
            bar.close()
        telemetry.sample()
        tokens_run = self.tokens_generated if o.generate else total - done_units
        counts = {"tokens": tokens_run, "nonfinite": self.nonfinite}
        scored = self.tokens_scored
        if world.size > 1:
            with self.times("merge"):
                counts = world.merge(self.states, counts, merge_kind)
                every = world.gather(scored)  # a collective: every rank calls it
                scored = sum(every) if world.main else scored
                if o.generate:  # every rank's responses on rank 0, in one process's order (by prompt)
                    every = world.gather(self.gen_rows)
                    self.gen_rows = {key: sorted((r for rows in every for r in rows.get(key, [])),
                                                 key=lambda r: r["index"]) for key in self.gen_shards} \
                        if world.main else self.gen_rows
        if not world.main:
            return None
        seconds, tokens_run, self.nonfinite = time.perf_counter() - t0, counts["tokens"], counts["nonfinite"]
        with self.times("summarize"):
            return self.summarize(seconds, tokens_run, telemetry, world.size, scored)

    def keep_finished(self) -> None:
        """After a failure past the loop (the summary, the outputs, an interrupt): save the finished run's progress not
        saved yet, so that --resume only writes the outputs. Nothing before the loop ended: the probes may then hold
        part of a unit (the last checkpoint stays)."""
        if self._finished is not None:
            self._ckpt.flush(self._finished)

    # ---- results ------------------------------------------------------------------------------------------------
    def summarize(self, seconds: float, tokens_run: int, telemetry: GpuTelemetry, processes: int = 1,
                  scored: int | None = None) -> dict:
        p, o = self.plan, self.opts
        models = {}
        for j, name in enumerate(p.tuned_dirs):
            tasks = {}
            for k, task in enumerate(self.tasks):
                block = self.probes[k].finalize(j, self._decode, o.top_tokens, list(task.problems))
                tasks[task.name] = mark_nonfinite(block, self.nonfinite.get(f"m{j}.t{k}", 0), o.dtype)
                if o.generate:
                    tasks[task.name]["generation"] = generation_summary(self.gen_rows.get((j, k), []))
            models[name] = {**model_summary(str(p.tuned_dirs[name]), tasks), "tokenizer": p.tokenizers[name]}
        return strict_json({
            "driftscope_version": versions()["driftscope"],
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "config": {
                "base": str(p.base_dir), "tuned": {k: str(v) for k, v in p.tuned_dirs.items()},
                "data": {k: str(v) for k, v in p.data.items()}, **o.as_dict(),
                "valid_vocab": dict(zip(p.tuned_dirs, self.valid_vocab)),
                "kinds": {"base": p.base.kind, "tuned": {k: c.kind for k, c in p.tuned.items()}},  # hf, gguf or lora
                "lora_applied": p.lora if any(c.kind == "lora" for c in p.tuned.values()) else None,
            },
            "versions": versions(), "machine": machine(self.device), "backends": backend_status(),
            "gpu_telemetry": telemetry.summary(),
            "timing": run_timing(seconds, tokens_run, tokens_run if scored is None else scored, processes,
                                 self.times),
            "models": models,
        })

    def responses(self) -> dict[str, dict[str, list[dict]]]:
        """Generate mode: model -> task -> response records in the paper's format (input = the rendered prompt)."""
        out: dict[str, dict[str, list[dict]]] = {}
        for j, name in enumerate(self.plan.tuned_dirs):
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
        for j, name in enumerate(self.plan.tuned_dirs):
            for k, task in enumerate(self.tasks):
                top = self.probes[k].pairs[j].shifted.finalize(decode=self._decode, top_k=None)["top"]
                rows.extend({"model": name, "task": task.name, **r} for r in top)
        return rows


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (`kill`, a scheduler's stop) ends the run like Ctrl-C: the progress up to the last complete unit is
    saved. Only the main thread can install signal handlers; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def drift(
    base: PathLike, tuned: PathLike | Sequence[PathLike], data: PathLike | Sequence[PathLike],
    out: PathLike | None = None, **options,
) -> DriftReport:
    """Compare `base` with each tuned checkpoint on each records file, with the options listed below.

    With `out`, writes summary.json, tokens.{parquet,jsonl}, pca_shift.json and report.html there and keeps a
    resumable state while running (`resume=True` continues an interrupted run). Returns a DriftReport.
    Under torchrun (WORLD_SIZE > 1, see distributed.py) each process runs its share of the batches; rank 0 merges
    them, writes the outputs and returns the summary; the other ranks return {"models": {}, "rank": r}.
    """
    start = time.perf_counter()
    opts, world = DriftOptions(**options), World.from_env()
    try:
        report = _drift(base, tuned, data, out, world.start(opts), world, start)
    finally:
        release_workspace()  # the torch reference's CPU logit buffers: reused from batch to batch, not kept after
        release_scratch()  # the forward's reused intermediates (kernels/scratch.py), likewise
    world.close()  # after a failure the group ends with the process: a teardown could wait on the failed collective
    return report


drift.__doc__ += options_doc(DriftOptions)  # help(driftscope.drift) lists every option, never stale


def _drift(base, tuned, data, out, opts: DriftOptions, world: World, start: float) -> DriftReport:
    times = StageTimes(opts.device, start=start)
    with times("plan"):
        p = plan(base, tuned, data, opts, out=out)
    out_dir = Path(out) if out is not None else None
    progress = {"fingerprint": fingerprint(p.base, p.tuned, p.data, opts), "done": {}, "pca_done": [],
                "generation": 0, "gen_done": {}, "gen_rows": {}, "nonfinite": {},
                **({"world_size": world.size} if world.size > 1 else {})}
    state = RunState(out_dir, world.rank, world.size) if out_dir is not None else None
    if state is not None:  # before any weights load: a refused resume or an interrupted run costs no load time
        out_dir.mkdir(parents=True, exist_ok=True)
        progress = state.begin(progress, resume=opts.resume, overwrite=opts.overwrite, barrier=world.barrier)
    with _sigterm_as_interrupt():
        run = _Run(p, out_dir, times)
        try:
            return _finish(run, run.run(progress, world), state, out_dir, opts, world, times)
        except BaseException:
            run.keep_finished()
            raise


def _finish(run: _Run, summary: dict | None, state: RunState | None, out_dir: Path | None, opts: DriftOptions,
            world: World, times: StageTimes) -> DriftReport:
    """The outputs of a finished run (rank 0), then its state removed."""
    if summary is None:  # a rank other than 0: its probes went into rank 0's, which writes the outputs
        if state is not None:
            world.barrier()  # rank 0 wrote them: this rank's state is done with
            state.remove()
        return DriftReport(summary={"models": {}, "rank": world.rank}, out=out_dir)
    report = DriftReport(summary=summary, out=out_dir, responses=run.responses() if opts.generate else {})
    if state is not None:
        from driftscope.drift_run.outputs import _write_json, write_outputs, write_responses

        try:
            with times("outputs"):
                report.files = write_outputs(out_dir, summary, run.shifted_rows(), opts.report)
                if opts.generate:
                    report.files.update(write_responses(out_dir, report.responses))
            finish_timing(summary["timing"], times)
            _write_json(report.files["summary"], summary)  # again, with the outputs' time (a small file)
        except OSError as exc:  # drift() saves the finished run's state on the way out: only the outputs are left
            raise disk_error(exc, "output", f"the finished run is kept in {state.root}: free space (or "
                             "make the folder writable), then rerun with --resume to write the outputs") from exc
        world.barrier()
        state.remove()
    else:
        finish_timing(summary["timing"], times)
    return report


def run_timing(seconds: float, tokens: int, scored: int, processes: int, times: StageTimes) -> dict:
    """summary.json's "timing": the loop's wall `seconds` over the batches (or prompts), the `tokens` it forwarded
    (generated, in generate mode) and the `scored` tokens the probes scored, each per second; the stages so far
    (exclusive wall seconds). `finish_timing` completes it when the run ends."""
    return {"seconds": seconds, "tokens": tokens, "processes": processes,
            "tokens_per_s": tokens / seconds if seconds else None,
            "scored_tokens": scored, "scored_tokens_per_s": scored / seconds if seconds else None,
            "wall_seconds": None, "process_seconds": None, "stages": times.summary()}


def finish_timing(timing: dict, times: StageTimes) -> None:
    """In place, at the end of drift(): `wall_seconds` of drift() up to its final summary.json (its stages, "other"
    included, add up to it; removing the resumable state and freeing buffers follow) and `process_seconds` since the
    process started (imports and set-up before drift() included)."""
    now = time.perf_counter()
    timing.update(wall_seconds=round(times.wall(now), 4), stages=times.summary(now),
                  process_seconds=None if (p := process_seconds()) is None else round(p, 4))
