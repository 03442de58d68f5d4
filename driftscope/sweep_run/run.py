"""`sweep(manifest, out)`: one base against a series of checkpoints, as passes of drift runs, resumable per checkpoint.

read and check the manifest (no weights) -> continue the sweep saved in OUT (refused when inputs or options that change
results differ) -> group the unfinished checkpoints into passes that fit the device -> run each pass as one
`drift(base, group, data, out=OUT/passes/<id>)` (interrupted passes resume) -> each checkpoint's entry in
OUT/checkpoints/<label>.json -> OUT/sweep.json (and, when driftscope.sweep_run.report is there, the sweep report).
"""
from __future__ import annotations

import datetime as _dt
import importlib
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from driftscope.cli_options import results
from driftscope.distributed import World
from driftscope.drift_run.checkpoint import STATE_DIR
from driftscope.drift_run.plan import check_out, unique_names
from driftscope.drift_run.run import drift
from driftscope.engine.checkpoint import Checkpoint
from driftscope.errors import InputError
from driftscope.sweep_run import plan as P
from driftscope.sweep_run.manifest import Manifest, read_manifest
from driftscope.sweep_run.state import SweepState
from driftscope.telemetry import note, versions
from driftscope.util import file_digest, read_json, write_json

log = logging.getLogger(__name__)
ENTRY_KEYS = ("tasks", "rank_shift_mean_of_task_means")  # what an entry takes from drift's summary.json models[name]


@dataclass
class SweepReport:
    """`.sweep` is what sweep.json holds; `.computed` the labels this call computed, `.passes_run` its pass ids."""
    sweep: dict
    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    passes_run: list[str] = field(default_factory=list)


def _order(m: Manifest) -> dict[str, tuple]:
    """label -> sort key: by ordinal (none last), then manifest order."""
    return {e.label: (e.ordinal is None, e.ordinal or 0, i) for i, e in enumerate(m.checkpoints)}


def _fingerprint(m: Manifest, base: Checkpoint, data: dict[str, Path], opts) -> dict:
    """Everything every checkpoint's numbers depend on besides the checkpoint itself."""
    return {"base": base.identity(), "data": {k: file_digest(p) for k, p in data.items()}, "options": results(opts),
            "pca_texts": file_digest(Path(opts.pca_texts)) if opts.pca_texts else None}


def _plan_passes(st: SweepState, m: Manifest, ckpts: dict[str, Checkpoint], finished: set[str], opts,
                 base: Checkpoint) -> list[dict]:  # finished: the listed checkpoints with an entry
    """The passes to run now: saved unfinished passes whose checkpoints are all still listed (they resume), then new
    passes for the rest. An unfinished saved pass with a checkpoint no longer listed is dropped."""
    listed, kept, todo = set(ckpts), [], []
    for p in st.passes:
        if all(st.entry_file(label).is_file() for label in p["labels"]):  # finished, listed or not
            kept.append(p)
        elif set(p["labels"]) <= listed:
            kept.append(p)
            todo.append(p)
        else:  # its folder goes, and with it the entries it wrote before it was cut short: they run again
            shutil.rmtree(st.out / "passes" / p["id"], ignore_errors=True)
            for label in p["labels"]:
                st.entry_file(label).unlink(missing_ok=True)
                finished.discard(label)
    placed = {label for p in todo for label in p["labels"]}
    order = _order(m)
    pool = sorted((x for x in ckpts if x not in finished and x not in placed), key=order.__getitem__)
    if pool:
        sizes = {x: P.weight_bytes(ckpts[x], opts.dtype, opts.lora) for x in pool}
        b = P.budget(base, opts.dtype, opts.max_batch_tokens, opts.base_device or opts.device,
                     opts.tuned_device[0] if opts.tuned_device else None, m.max_group)
        groups = P.group(pool, sizes, b)
        note(f"sweep: {len(pool)} checkpoint{'s' * (len(pool) > 1)} to compute in {len(groups)} "
             f"pass{'es' * (len(groups) > 1)} (up to {m.max_group} per pass; "
             f"{max(b.bytes, 0) / 2**20:,.0f} MiB free for tuned weights next to the base)", opts.progress)
        new = [{"id": P.pass_id(g), "labels": g, "seconds": None} for g in groups]
        kept.extend(new)
        todo.extend(new)
    st.passes = kept
    st.save()
    return todo


def _entry(label: str, e_path: Path, ck: Checkpoint, identity: dict, pass_id: str, name: str, model: dict) -> dict:
    return {"label": label, "path": str(e_path), "kind": ck.kind, "identity": identity, "pass": pass_id,
            "model": name, **{k: model[k] for k in ENTRY_KEYS}}


def _run_pass(p: dict, m: Manifest, ckpts: dict[str, Checkpoint], identities: dict, st: SweepState) -> None:
    """One drift call for the pass's checkpoints (resuming its interrupted state), then each checkpoint's entry."""
    pdir = st.out / "passes" / p["id"]
    t0 = time.perf_counter()
    report = drift(m.base, [ckpts[x].path for x in p["labels"]], m.data, out=pdir,
                   **{**m.options, "resume": (pdir / STATE_DIR).is_dir(), "overwrite": False,
                      "report": False})  # sweep.html has the curves: no report.html per pass
    p["seconds"] = time.perf_counter() - t0
    models = report.summary["models"]
    assert len(models) == len(p["labels"]), (list(models), p["labels"])
    for label, (name, model) in zip(p["labels"], models.items()):  # drift keeps the order of its tuned list
        assert model["path"] == str(ckpts[label].path), (model["path"], ckpts[label].path)
        st.put_entry(label, _entry(label, ckpts[label].path, ckpts[label], identities[label], p["id"], name, model))
    st.save()


def _eval(m: Manifest) -> tuple[dict | None, dict[str, dict]]:
    """(sweep.json's "eval" block, label -> scores) from the manifest's score files."""
    if not m.scores:
        return None, {}
    from driftscope.eval.scores import read_scores
    from driftscope.eval.ti import transferability_indices

    scores = {label: read_scores(f) for label, f in m.scores.items()}
    base = scores.pop("base")
    ti = {k: r.to_dict() for k, r in transferability_indices(base, scores).items()} if scores else None
    return {"base": base, "ti": ti}, scores


def sweep(manifest: str | Path | Mapping, out: str | Path, *, overwrite: bool = False, **overrides) -> SweepReport:
    """Run the sweep a manifest describes (a JSON/YAML file, or its dict) into `out`; rerunning it continues: finished
    checkpoints are kept, interrupted passes resume, new checkpoints get new passes. `overrides` replace manifest keys
    (drift options, max_group, ordinal); `overwrite` discards the sweep saved in `out`. Returns a SweepReport."""
    if World.from_env().size > 1:
        raise InputError("sweep runs as one process, not under torchrun: run it without torchrun (its passes are "
                         "drift runs; to scale one out, run driftscope drift under torchrun)")
    t_start = time.perf_counter()
    m = read_manifest(manifest, overrides)
    opts, out = m.drift_options(), Path(out)
    check_out(out)
    base = Checkpoint.open(m.base, "base")
    entries = {e.label: e for e in m.checkpoints}
    ckpts = {x: Checkpoint.open(e.path, f"checkpoint {x!r}", base=base) for x, e in entries.items()}
    data = unique_names(m.data, key=lambda p: p.stem)
    out.mkdir(parents=True, exist_ok=True)
    st = SweepState(out)
    st.begin(_fingerprint(m, base, data, opts), overwrite)
    identities = {x: c.identity() for x, c in ckpts.items()}
    done = {x: e for x in ckpts if (e := st.entry(x, identities[x])) is not None}
    todo = _plan_passes(st, m, ckpts, set(done), opts, base)
    computed: list[str] = []
    finished = len({x for x in done if not any(x in p["labels"] for p in todo)})
    for i, p in enumerate(todo):
        spent = [q["seconds"] for q in todo[:i]]
        eta = f", eta {sum(spent) / len(spent) * (len(todo) - i):,.0f} s" if spent else ""
        note(f"sweep: pass {i + 1}/{len(todo)} ({', '.join(p['labels'])}); {finished}/{len(ckpts)} checkpoints "
             f"done{eta}", opts.progress)
        _run_pass(p, m, ckpts, identities, st)
        computed.extend(p["labels"])
        finished += len(p["labels"])
    result = build(m, st, base, data, opts, time.perf_counter() - t_start, computed)
    files = {"sweep.json": write_json(out / "sweep.json", result)}
    files.update(_report(result, out, opts.progress))
    return SweepReport(result, out, files, computed, [p["id"] for p in todo])


def build(m: Manifest, st: SweepState, base: Checkpoint, data: dict[str, Path], opts, seconds: float,
          computed: list[str]) -> dict:
    """sweep.json: the finished entries of the manifest's checkpoints, sorted by ordinal."""
    evals, scores = _eval(m)
    order = _order(m)
    rows = []
    for e in sorted(m.checkpoints, key=lambda e: order[e.label]):
        saved = read_json(st.entry_file(e.label), "sweep checkpoint entry", dict)
        rows.append({"label": e.label, "path": str(e.path), "kind": saved["kind"], "ordinal": e.ordinal,
                     "pass": saved["pass"], **{k: saved[k] for k in ENTRY_KEYS}, "scores": scores.get(e.label)})
    used = {r["pass"] for r in rows}
    return {
        "driftscope_version": versions()["driftscope"],
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "manifest": None if m.file is None else str(m.file), "ordinal": m.ordinal,
        "base": {"path": str(m.base), "kind": base.kind},
        "data": {k: str(p) for k, p in data.items()}, "options": opts.as_dict(), "checkpoints": rows, "eval": evals,
        "passes": [{"id": p["id"], "labels": p["labels"], "seconds": p["seconds"],
                    "summary": f"passes/{p['id']}/summary.json"} for p in st.passes if p["id"] in used],
        "timing": {"seconds": seconds, "base_passes": len(used), "checkpoints": len(rows),
                   "computed_now": len(computed)},
    }


def _report(result: dict, out: Path, progress: bool) -> dict[str, Path]:
    """The sweep report's files (sweep.html, PNGs, sweep.parquet) when driftscope.sweep_run.report is installed."""
    try:
        report = importlib.import_module("driftscope.sweep_run.report")
    except ModuleNotFoundError as exc:
        if exc.name != "driftscope.sweep_run.report":
            raise
        note("sweep: no sweep report (driftscope.sweep_run.report is not there yet); sweep.json has every number",
             progress)
        return {}
    return dict(report.write_report(result, out) or {})
