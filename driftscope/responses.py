"""`driftscope generate`: a prompts file -> a responses file in the paper's {"input", "output"} record format,
resumable.

Each finished sequence is appended to `OUT.partial` at once (the first line is the run's fingerprint); an interrupted
run given the same command continues from it, and a run with other inputs or options is refused, naming what differs.
At the end the responses are written to OUT in prompt order and the partial file is removed. Random draws are
addressed by (seed, record index, sample, step), so a continued run gives what an uninterrupted one would have.
Under torchrun (`torchrun --nproc-per-node=K -m driftscope generate ...`) every rank checks every prompt, generates
its share of the records (`shard_records`) into `OUT.partial.rank{r}`, and rank 0 gathers the rows and writes the OUT
one process would; an interrupted run continues under the same K only.

Records written: `input` (the full rendered prompt), `output` (the text, EOS left out, cut before a stop string),
`output_token_ids` (every generated id, EOS included: what `driftscope drift` scores), `finish_reason`,
`stop_reason`, `index` (the record's ordinal in the prompts file), `sample`, and `input_token_ids` when the prompt
ids are not what `input` encodes to (token-id prompts).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from driftscope.distributed import World, processes
from driftscope.telemetry import Progress
from driftscope.cli_options import cli, results
from driftscope.engine.checkpoint import Checkpoint
from driftscope.engine.data import fit_prompts
from driftscope.records import skipped
from driftscope.engine.decoding import GenerationEngine
from driftscope.engine.generate import load_for_generation, make_requests
from driftscope.engine.prompts import render_prompt
from driftscope.records import read_prompts
from driftscope.engine.sampling import SamplingParams
from driftscope.errors import InputError
from driftscope.options import GenerationOptions, LimitOptions, RunOptions
from driftscope.util import file_digest, write_jsonl

log = logging.getLogger(__name__)
PARTIAL_FORMAT = 2  # 2: the options of the fingerprint are GenerateOptions' result fields, by name


@dataclass
class GenerateOptions(RunOptions, LimitOptions, GenerationOptions):
    """Options of `generate_responses` besides the sampling: the shared parts (driftscope.options) and its own; each
    field's cli() metadata makes its flag."""

    restart: bool = field(default=False, metadata=cli(  # instead of refusing
        "discard an interrupted run in OUT.partial (OUT.partial.rank* under torchrun) with other inputs, options or "
        "number of processes", cosmetic=True))


@dataclass
class ResponsesReport:
    """What a run wrote. Under torchrun rank 0's counts and stats are every rank's added up (max_running: the
    largest); another rank wrote no OUT: records 0, its own resumed count and engine stats."""

    out: Path
    records: int  # response records written
    resumed: int  # of which were read back from an interrupted run
    problems: list[str]
    stats: dict
    rank: int = 0
    processes: int = 1


def _fingerprint(ckpt: Checkpoint, data: Path, params: SamplingParams, o: GenerateOptions) -> dict:
    return {
        "format": PARTIAL_FORMAT, "model": str(ckpt.path.resolve()), "checkpoint": ckpt.identity(),
        "data": str(data.resolve()), "data_sha256": file_digest(data), "sampling": results(params), **results(o),
    }


class PartialFile:
    """Where a run keeps its finished rows until OUT is written: OUT.partial for one process, OUT.partial.rank{r} for
    rank r under torchrun. Its first line is the run's fingerprint, then one line per finished sequence."""

    def __init__(self, out: Path, world: World, fingerprint: dict, restart: bool):
        self.out, self.world, self.restart = out, world, restart
        self.fp = fingerprint | ({"world_size": world.size} if world.size > 1 else {})
        self.path = self._name(world.rank, world.size)
        self.stale: set[Path] = set()  # an interrupted run's files by another number of processes: --restart
        self.done = self._read()  # (index, sample) -> the row, finished here or by the interrupted run

    def _name(self, rank: int, size: int) -> Path:
        return self.out.with_name(self.out.name + ".partial" + (f".rank{rank}" if size > 1 else ""))

    def _names(self, size: int) -> str:  # the partial files of a run of `size` processes, for messages
        return str(self._name(0, 1)) + (".rank*" if size > 1 else "")

    def _found(self) -> dict[int | None, Path]:
        """The partial files beside OUT: {None: OUT.partial}, {r: OUT.partial.rank{r}} (a torchrun run's)."""
        found: dict[int | None, Path] = {}
        if (one := self._name(0, 1)).is_file():
            found[None] = one
        pattern = re.compile(re.escape(self.out.name) + r"\.partial\.rank(\d+)")
        for p in self.out.parent.iterdir() if self.out.parent.is_dir() else ():  # not glob: OUT's name may hold [
            if (m := pattern.fullmatch(p.name)) and p.is_file():
                found[int(m[1])] = p
        return found

    def _read(self) -> dict[tuple[int, int], dict]:
        """The finished rows of an interrupted run ({} when there is none, or with --restart); each partial file's
        fingerprint is read once, this rank's file whole, the others' first lines only."""
        w, found = self.world, self._found()
        mine = None if w.size == 1 else w.rank
        rows = self.path.read_bytes().split(b"\n") if mine in found else [b""]
        heads = {r: _head(rows[0] if r == mine else p) for r, p in found.items()}
        sizes = (h.get("world_size") for h in heads.values() if h is not None)
        saved = None if not found else 1 if None in found else next(  # a rank file's world_size, or its ranks'
            (n for n in sizes if isinstance(n, int) and n > 1), max(max(found) + 1, 2))
        if saved not in (None, w.size):
            if not self.restart:
                raise InputError(f"cannot continue {self._names(saved)}: the interrupted run ran as "
                                 f"{processes(saved)}, this run as {processes(w.size)}; rerun it with {saved} process"
                                 f"{'es' * (saved > 1)} to finish it, or pass --restart to discard it")
            if w.main:  # rank 0 removes the others; each rank rewrites its own
                log.warning("%s: discarding an interrupted run of %s (--restart)", self._names(saved),
                            processes(saved))
                self.stale = set(found.values()) - {self._name(r, w.size) for r in range(w.size)}
            return {}
        if mine not in found:
            return {}
        if (old := heads[mine]) is None:
            if self.restart:
                return {}
            raise ValueError(f"{self.path}: not a driftscope partial responses file (first line is no fingerprint); "
                             "remove it or pass --restart")
        if old != self.fp:
            if self.restart:
                log.warning("%s: discarding an interrupted run with other inputs or options (--restart)", self.path)
                return {}
            keys = [k for k in self.fp if old.get(k) != self.fp[k]] + [k for k in old if k not in self.fp]
            raise ValueError(f"{self.path}: an interrupted run with other inputs or options is there ("
                             + "; ".join(f"{k}: {old.get(k)!r} then, {self.fp.get(k)!r} now" for k in keys)
                             + "); rerun it with its own options to finish it, or pass --restart to discard it")
        done = {}
        for n, raw in enumerate(rows[1:], start=2):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                done[(row["index"], row["sample"])] = row
            except (ValueError, KeyError, TypeError):
                if n == len(rows) or (n == len(rows) - 1 and not rows[-1].strip()):
                    break  # the line being written when the run was killed
                raise ValueError(f"{self.path}:{n}: damaged line in the partial responses file; "
                                 "remove it or pass --restart") from None
        return done

    def begin(self, resumed: int, todo: int) -> None:
        """After every rank read the partial files: the stale ones go, the counts are said, and this rank's file is
        rewritten whole (fingerprint, then the rows read back): a line cut by a kill is never appended to."""
        w = self.world
        w.barrier()  # every rank has looked at the partial files before any rank rewrites or removes one
        for p in self.stale:
            p.unlink(missing_ok=True)
        counts = w.gather((resumed, todo))
        if w.main and (every_resumed := sum(c[0] for c in counts)):
            log.warning("continuing %s: %d of %d responses were done", self.path if w.size == 1 else
                        f"{self._names(w.size)} ({processes(w.size)})", every_resumed,
                        every_resumed + sum(c[1] for c in counts))
        write_jsonl(self.path, [{"fingerprint": self.fp}, *self.done.values()])

    @contextmanager
    def appending(self) -> Iterator[Callable[[dict], None]]:
        """`append(row)`: a finished row, in `done` and on disk at once."""
        with open(self.path, "a", encoding="utf-8") as f:
            def append(row: dict) -> None:
                self.done[(row["index"], row["sample"])] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()

            yield append

    def finish(self, rows: list[dict] | None) -> None:
        """Rank 0 writes OUT (`rows`); then every rank removes its partial file: a crash before that loses nothing."""
        if rows is not None:
            write_jsonl(self.out, rows)
        self.world.barrier()
        self.path.unlink()


def _head(line: bytes | Path) -> dict | None:
    """The fingerprint on a partial file's first line (read from the file when given its path), or None."""
    try:
        if isinstance(line, Path):  # another rank's file: only its fingerprint is read
            with open(line, "rb") as f:
                line = f.readline()
        fp = json.loads(line)["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fp if isinstance(fp, dict) else None


def shard_records(world: World, prompt_tokens: Sequence[int], params: SamplingParams, context: int) -> list[int]:
    """The records (positions in `prompt_tokens`) this rank generates; every rank deals the same shares, so does a
    resumed run. A record costs n × (prompt + max_new_tokens) tokens, capped at the context: the engine reserves that
    much KV cache for each of its n sequences and the decode steps are bounded by max_new_tokens (where EOS falls is
    not known before); the n samples of a record stay on one rank, so its rows are written together."""
    sizes = [params.n * min(t + params.max_new_tokens, context) for t in prompt_tokens]
    return world.shard([sizes])[0]


@contextmanager
def _quiet(logger: logging.Logger, quiet: bool) -> Iterator[None]:
    """`logger`'s warnings dropped while `quiet`: the ranks other than 0 repeat rank 0's checks (and warnings)."""
    def drop(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING

    if quiet:
        logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def generate_responses(model: str | Path, data: str | Path, out: str | Path, params: SamplingParams,
                       options: GenerateOptions | None = None) -> ResponsesReport:
    """Generate responses for every usable prompt of `data` into `out` (see the module docstring); under torchrun
    (WORLD_SIZE > 1) each process generates its share and rank 0 writes `out`."""
    world = World.from_env()
    report = _generate(Path(model), Path(data), Path(out), params, options or GenerateOptions(), world)
    world.close()  # after a failure the group ends with the process: a teardown could wait on the failed collective
    return report


def _generate(model_dir: Path, data: Path, out: Path, params: SamplingParams, o: GenerateOptions,
              world: World) -> ResponsesReport:
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the responses file (e.g. {out / 'responses.jsonl'})")
    if out.exists() and not o.overwrite:  # every rank decides this before any rank writes (rank 0 writes OUT last)
        raise ValueError(f"--out {out} exists (a finished run); pass --overwrite to replace it")
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise InputError(f"--out {out} lies below the file {above}; name a responses file in a folder")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    with _quiet(logging.getLogger(skipped.__module__), not world.main):  # the bad records, in one line
        records, problems = read_prompts(data, o.prompt_field)
    if not records:
        raise InputError(f"{data}: no usable prompt record ({skipped(problems) if problems else 'no records'})")
    if o.limit is not None:
        records = records[: o.limit]
    ckpt = Checkpoint.open(model_dir, "--model")
    partial = PartialFile(out, world, _fingerprint(ckpt, data, params, o), o.restart)
    done = partial.done
    tok = ckpt.tokenizer()
    rendered, texts = [], {}
    for r in records:  # rendered and checked against the context before the weights load
        text, ids = render_prompt(r.prompt, tok, r.where, chat=o.chat, system=o.system, thinking=o.thinking,
                                  chat_template_kwargs=o.chat_template_kwargs, rendered=r.rendered)
        texts[r.index] = (text, ids)
        rendered.append((r.index, ids, r.where))
    config = ckpt.config()
    with _quiet(logging.getLogger(fit_prompts.__module__), not world.main):
        skip = fit_prompts([(where, len(ids)) for _, ids, where in rendered], params.max_new_tokens,
                           config.max_position_embeddings, config.source, o.overlong, problems)
    rendered = [x for x in rendered if x[2] not in skip]
    if not rendered:
        raise InputError(f"{data}: no usable prompt record ({skipped(problems)})")
    texts = {index: texts[index] for index, _, _ in rendered}
    mine = [rendered[i] for i in shard_records(world, [len(ids) for _, ids, _ in rendered], params,
                                               config.max_position_embeddings)]
    share = {index for index, _, _ in mine}
    resumed = sum(1 for key in done if key[0] in share)
    device = world.join(o.device, o.dist_timeout, "--device")
    m, tok = load_for_generation(model_dir, tok, device=device, dtype=o.dtype, flag="--model")
    engine = GenerationEngine(m, tok, cache_memory=o.cache_memory, block_size=o.block_size,
                              max_num_seqs=o.max_num_seqs, max_step_tokens=o.max_step_tokens)
    for q in make_requests(rendered, params):  # every bad prompt is refused before the first token is generated,
        if (q.prompt_index, q.sample_index) not in done:  # on every rank (not only in its share)
            engine.check_request(q, q.where)
    requests = [q for q in make_requests(mine, params) if (q.prompt_index, q.sample_index) not in done]
    partial.begin(resumed, len(requests))
    bar = Progress(len(requests), "generate", o.progress if world.main else False, "seq")  # rank 0's share
    with partial.appending() as append:
        try:
            for g in engine.run(requests, progress=bar):
                append({"index": g.index, "sample": g.sample, "output": g.text, "output_token_ids": g.token_ids,
                        "finish_reason": g.finish_reason, "stop_reason": g.stop_reason})
        finally:
            bar.close()
    st = engine.stats
    stats = {"steps": st.steps, "decode_tokens": st.decode_tokens, "prefill_tokens": st.prefill_tokens,
             "preemptions": st.preemptions, "max_running": st.max_running, "cache_tokens": engine.cache_tokens}
    every = world.gather((done, resumed, stats))
    if not world.main:
        partial.finish(None)
        return ResponsesReport(out, 0, resumed, problems, stats, world.rank, world.size)
    done = {key: row for rank_done, _, _ in every for key, row in rank_done.items()}
    rows = []
    for index, ids_text in sorted(texts.items()):
        text, ids = ids_text
        for s in range(params.n):
            row = dict(done[(index, s)])
            inp = text if text is not None else (tok.decode(ids) if tok is not None else None)
            rec = {"input": inp, **{k: row[k] for k in ("output", "output_token_ids", "finish_reason", "stop_reason")},
                   "index": index, "sample": s}
            if inp is None or tok is None or tok.encode(inp, add_special_tokens=False) != ids:
                rec["input_token_ids"] = ids
            rows.append(rec)
    partial.finish(rows)
    stats = {k: (max if k == "max_running" else sum)(e[2][k] for e in every) for k in stats}
    return ResponsesReport(out, len(rows), sum(e[1] for e in every), problems, stats, world.rank, world.size)
