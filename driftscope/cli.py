"""Command-line entry point `driftscope`: argparse wiring, and the one error boundary of every command.

A user error (InputError or any ValueError, OSError, ImportError, JSON or Jinja template error) prints one line
`driftscope CMD: error: ...` and exits 2; Ctrl-C prints how to continue and exits 130 (SIGTERM in a drift run:
143); anything else is a bug: its traceback, then `driftscope CMD: internal error: ...`, exit 1. `driftscope --debug
CMD ...` shows user errors' tracebacks too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback

from driftscope.cli_options import add_options, check_ranges, options_from

_DEBUG_HELP = "show the traceback of user errors too; give it before the command: driftscope --debug drift ..."


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other user error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_backends(args: argparse.Namespace) -> int:
    from driftscope.kernels import backend_status

    print(json.dumps(backend_status(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from driftscope.demo.run import format_summary, run_demo

    report = run_demo(args.out, seed=args.seed, progress=True)
    print(format_summary(report))
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    print(f"open {report.files['report']} in a browser to see the report")
    return 0


def _num(value, spec: str) -> str:
    """`value` formatted with `spec`, or n/a when it is missing or not a finite number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return format(value, spec) if ok else "n/a"


def _cmd_drift(args: argparse.Namespace) -> int:
    import logging

    from driftscope.drift_run.options import DriftOptions
    from driftscope.drift_run.run import drift
    from driftscope.probes.kld_stats import llama_cpp_line

    logging.basicConfig(level=logging.WARNING, format="driftscope: %(message)s")
    report = drift(args.base, args.tuned, args.data, args.out, **options_from(args, DriftOptions))
    for model, m in report.summary["models"].items():
        for task, t in m["tasks"].items():
            kl, rank = (t.get("kl_tb") or {}).get("token_mean"), (t.get("rank_shift") or {}).get("token_mean")
            print(f"{model} / {task}: {t.get('tokens')} tokens, {t.get('samples')} samples, "
                  f"KL(tuned||base) {_num(kl, '.5f')}, sampled KL {_num(t.get('sampled_kl'), '.5f')}, "
                  f"rank shift {_num(rank, '.3f')}, top-1 agreement {_num(t.get('top1_agreement'), '.1%')}")
            if t.get("llama_cpp") is not None:  # llama.cpp's --kl-divergence headline, base = the reference
                print(f"  llama.cpp: {llama_cpp_line(t['llama_cpp'])}")
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import logging

    from driftscope.responses import GenerateOptions, generate_responses
    from driftscope.records import skipped
    from driftscope.engine.sampling import SamplingParams

    logging.basicConfig(level=logging.WARNING, format="driftscope: %(message)s")
    if (world := _torchrun_size()) > 1:  # the Ctrl-C line (_run) then
        args.interrupted = (f"interrupted; rerun the same torchrun command ({world} processes) to continue "
                            "({out}.partial.rank* keep what was done)")
    sampling = options_from(args, SamplingParams)
    check_ranges(SamplingParams, sampling)  # named with their flags, as drift's
    params = SamplingParams(**sampling)
    report = generate_responses(args.model, args.data, args.out, params,
                                GenerateOptions(**options_from(args, GenerateOptions)))
    if report.rank != 0:  # under torchrun rank 0 wrote OUT and prints the totals
        return 0
    st = report.stats
    print(f"{report.records} responses -> {report.out} ({report.resumed} from the interrupted run; "
          f"{st['decode_tokens'] + st['prefill_tokens']} tokens computed in {st['steps']} steps, "
          f"{st['preemptions']} preemptions" + (f", {report.processes} processes" if report.processes > 1 else "")
          + ")")
    if report.problems:
        print(skipped(report.problems), file=sys.stderr)
    return 0


def _add_drift(sub, with_options: bool) -> None:
    p = sub.add_parser("drift", help="compare a base model with tuned models on records files, in lockstep")
    p.add_argument("--base", required=True, help="base checkpoint: an HF folder (config.json + safetensors + "
                   "tokenizer) or a .gguf file")
    p.add_argument("--tuned", required=True, action="append", help="tuned checkpoint (repeatable): an HF folder, a "
                   ".gguf file, or a LoRA adapter folder (adapter_config.json) for --base")
    p.add_argument("--data", required=True, action="append", help="records file: JSONL/JSON/parquet (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    if with_options:
        from driftscope.drift_run.options import DriftOptions

        add_options(p, DriftOptions)
    p.set_defaults(func=_cmd_drift,
                   interrupted="interrupted; continue with the same command plus --resume (state in {out})")


def _add_generate(sub, with_options: bool) -> None:
    p = sub.add_parser("generate", help="generate responses for a prompts file with continuous batching")
    p.add_argument("--model", required=True, help="checkpoint: an HF folder (config.json + safetensors + "
                   "tokenizer), a .gguf file, or a LoRA adapter folder whose adapter_config.json names a local base")
    p.add_argument("--data", required=True, help="prompts file: JSONL/JSON/parquet records")
    p.add_argument("--out", required=True, help="responses file (JSONL, the paper's {input, output} records)")
    if with_options:
        from driftscope.engine.sampling import SamplingParams
        from driftscope.responses import GenerateOptions

        add_options(p, SamplingParams)
        add_options(p, GenerateOptions)
    p.set_defaults(func=_cmd_generate,
                   interrupted="interrupted; rerun the same command to continue ({out}.partial keeps what was done)")


def _cmd_sweep(args: argparse.Namespace) -> int:
    import logging

    from driftscope.sweep_run import sweep

    logging.basicConfig(level=logging.WARNING, format="driftscope: %(message)s")
    report = sweep(args.manifest, args.out, overwrite=args.overwrite,
                   **({} if args.progress is None else {"progress": args.progress}))
    s = report.sweep
    for c in s["checkpoints"]:
        kls = ", ".join(f"{task} {_num((t.get('kl_tb') or {}).get('token_mean'), '.5f')}"
                        for task, t in c["tasks"].items())
        print(f"{c['label']} ({s['ordinal']} {_num(c['ordinal'], 'g')}): KL(tuned||base) {kls}")
    n = s["timing"]["base_passes"]
    print(f"{len(report.computed)} of {len(s['checkpoints'])} checkpoints computed now; {n} base pass{'es' * (n != 1)}")
    plots = [p for kind, p in report.files.items() if "/" in kind]  # the report's PNGs: their folder, once
    for kind, path in report.files.items():
        if "/" not in kind:
            print(f"{kind}: {path}")
    if plots:
        print(f"plots: {len(plots)} PNGs in {plots[0].parent}")
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="one base against a series of checkpoints (a training run) from a manifest: "
                       "grouped passes, resumable per checkpoint, one report")
    p.add_argument("manifest", help="JSON or YAML: {base, checkpoints: [{path, label, step}, ...] or a glob or a "
                   "folder of checkpoint-* dirs, data: [records files], drift options by name}")
    p.add_argument("--out", required=True, help="output folder; rerunning the same manifest continues the sweep there")
    p.add_argument("--overwrite", action="store_true", help="discard the sweep saved in --out and start over")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr (default: the manifest's, else on)")
    p.set_defaults(func=_cmd_sweep, interrupted="interrupted; rerun the same command to continue (state in {out})")


def build_parser(cmd: str | None = None) -> argparse.ArgumentParser:
    """The `driftscope` parser. drift's, generate's and eval's flags come from their options dataclasses (whose modules
    import torch); given `cmd`, the subcommand about to run, only that one gets them."""
    parser = _Parser(prog="driftscope", description="lockstep base-vs-tuned LLM drift probing")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("backends", help="print which kernel backends are available and why")
    p.set_defaults(func=_cmd_backends)
    p = sub.add_parser("demo", help="offline demo on a tiny base/tuned pair built on the spot")
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    _add_drift(sub, cmd in (None, "drift"))
    _add_generate(sub, cmd in (None, "generate"))
    _add_sweep(sub)

    from driftscope.eval import eval_cli, ti_cli

    eval_cli.add_parser(sub, cmd in (None, "eval"))
    ti_cli.add_parser(sub)
    sub.add_parser("lm-eval", help="lm-eval's own CLI with the 'driftscope' model registered and driftscope's tasks "
                   "(ds_*) on the include path; every argument goes to lm-eval", add_help=False)
    return parser


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is something the user can fix (the rest are bugs); ImportError: an optional dependency."""
    jinja = sys.modules.get("jinja2")  # a template error can only come from an imported jinja2
    return isinstance(exc, (ValueError, OSError, ImportError)) or (
        jinja is not None and isinstance(exc, jinja.TemplateError))


def _torchrun_size() -> int:
    """The WORLD_SIZE torchrun set for this process: 1 outside torchrun (or when it is not a number: World.from_env
    names that error where a command joins)."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() and int(world) > 1 else 1


def is_group_failure(exc: BaseException) -> bool:
    """Under torchrun: a collective that failed because another process stopped or timed out (that process's own
    message says why); not a bug of this one."""
    if _torchrun_size() == 1:
        return False
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("closed by peer", "reset by peer",
                                                                           "timed out", "Timed out"))


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line; an OSError names its path (`exc.filename`) when the message lacks it."""
    msg = str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:  # not str(exc): "[Errno 17] File exists: 'x'"
        what = str(exc.strerror or (exc.args[0] if exc.args else ""))
        paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        msg = what if str(exc.filename) in what else f"{paths}: {what}"
    if isinstance(exc, ModuleNotFoundError):
        msg += " (an optional dependency: install it; the eval commands need pip install 'driftscope[eval]')"
    msg = "; ".join(line.strip() for line in msg.splitlines() if line.strip())
    return msg or type(exc).__name__


def _run(args: argparse.Namespace) -> int:
    """args.func(args) inside the error boundary (see the module docstring)."""
    try:
        _refuse_torchrun(args)
        note = _threads(args)
        rc = args.func(args)
        if note:  # after the run, so that a refused input stays one line
            print(note, file=sys.stderr)
        return rc
    except KeyboardInterrupt as exc:
        print(getattr(args, "interrupted", "interrupted").format(**vars(args)), file=sys.stderr)
        from driftscope.errors import Terminated

        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:
        if is_group_failure(exc):
            import os

            if args.debug:
                traceback.print_exc()
            hint = getattr(args, "interrupted", "").format(**vars(args)).removeprefix("interrupted; ")
            print(f"driftscope {args.cmd}: error: process {os.environ.get('RANK', '?')} of {_torchrun_size()}: "
                  f"another process stopped or timed out ({type(exc).__name__}: {one_line(exc)}); its own message says "
                  f"why" + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 2
        user = is_user_error(exc)
        if args.debug or not user:
            traceback.print_exc()
        if user:
            print(f"driftscope {args.cmd}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        print(f"driftscope {args.cmd}: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(a bug: please report it with the traceback above)", file=sys.stderr)
        return 1


def _refuse_torchrun(args: argparse.Namespace) -> None:
    """drift, generate and eval --model shard their work under torchrun; every process of another command would redo
    all of it and write the same files."""
    from driftscope.errors import InputError

    if (world := _torchrun_size()) == 1:
        return
    if args.cmd == "eval" and getattr(args, "responses", None) is not None:
        raise InputError(f"driftscope eval --responses grades a file as one process, not under torchrun "
                         f"(WORLD_SIZE={world}): run it without torchrun")
    if args.cmd not in ("drift", "generate", "eval", "lm-eval"):
        raise InputError(f"driftscope {args.cmd} runs as one process, not under torchrun (WORLD_SIZE={world}): run it "
                         "without torchrun; drift, generate and eval --model are the commands that scale out")


def _threads(args: argparse.Namespace) -> str:
    """A model run on the CPU of a busy machine (1-minute load average >= the usable cores) with OMP_NUM_THREADS unset
    runs on one thread: torch's default, one per core, competes with the load (a 135M forward ran ~5x faster on 1
    thread than on 2 on a loaded 2-core machine). Returns the line that says so (printed when the run ends), or ""."""
    import os

    if args.cmd not in ("drift", "generate", "eval", "demo") or "OMP_NUM_THREADS" in os.environ:
        return ""
    import torch

    devices = [getattr(args, "device", None), getattr(args, "base_device", None), *getattr(args, "tuned_device", ())]
    auto = "cuda" if args.cmd == "eval" and torch.cuda.is_available() else "cpu"  # eval's default device
    if any(str(d or auto).split(":")[0] != "cpu" for d in devices) or not hasattr(os, "getloadavg"):
        return ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load < cores or (was := torch.get_num_threads()) == 1:
        return ""
    torch.set_num_threads(1)
    return (f"driftscope {args.cmd}: ran on 1 thread, not {was}: the machine was busy (load average {load:.1f} on "
            f"{cores} cores); set OMP_NUM_THREADS=N to choose")


def passive_openmp(environ=None, modules=None) -> bool:
    """Make OpenMP's idle threads sleep instead of spin (OMP_WAIT_POLICY=PASSIVE) unless the user chose a policy or
    torch is loaded already (the runtime reads it once, at load). Spinning threads hold their core at every barrier,
    and on a shared CPU each barrier then waits for a preempted thread: a real-weights drift ran 2.0-3.4x faster
    with PASSIVE at load 5-10 on 2 cores (bench/RESULTS.md, [13]). Returns whether it set it."""
    import os

    environ, modules = os.environ if environ is None else environ, sys.modules if modules is None else modules
    if "torch" in modules or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"} & set(environ):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 256 << 20  # glibc's largest mmap threshold; heap kept free up to 256 MiB


def steady_malloc(environ=None, mallopt=None) -> bool:
    """Keep freed memory for reuse: glibc's mmap threshold fixed at its maximum (32 MiB) and the heap trimmed only
    beyond 256 MiB free, unless the user tuned malloc (MALLOC_*_ or GLIBC_TUNABLES). By default glibc maps a
    layer's 16-27 MiB intermediates afresh or trims them back to the OS, so each use paid page faults and the kernel's
    zeroing: 1.96 M faults per lockstep forward of SmolLM2 at T = 7,042, ~2 s of ~22 (bench/RESULTS.md). A no-op
    where the C library has no `mallopt` (not glibc). Returns whether it set both."""
    import ctypes
    import os

    environ = os.environ if environ is None else environ
    if any(k.startswith("MALLOC_") for k in environ) or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return False
    if mallopt is None:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is None:
            return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def main(argv: list[str] | None = None) -> int:
    """Run `driftscope ARGV`; returns the exit code (0, 1 a bug, 2 a user error, 130 interrupted, 143 terminated)."""
    passive_openmp()
    steady_malloc()
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[1:] if argv[:1] == ["--debug"] else argv
    if rest[:1] == ["lm-eval"]:  # a passthrough: lm-eval parses its own arguments and reports its usage errors; an
        from driftscope.eval.eval_cli import run_lm_eval  # error raised in its run crosses the boundary like any other

        return _run(argparse.Namespace(cmd="lm-eval", debug=rest is not argv, func=lambda _: run_lm_eval(rest[1:])))
    try:
        args = build_parser(rest[0] if rest else None).parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    return _run(args)


def command() -> None:
    """The `driftscope` console script and `python -m driftscope`: main(), then `exit_fast` with its code."""
    exit_fast(main())


def exit_fast(code: int) -> None:
    """Exit with `code` as a normal exit would for everything outside the process (standard streams flushed, every
    atexit handler run: logging, temporary folders, child processes), without the interpreter's teardown: freeing
    every module and object and a last garbage collection took 0.5-0.7 s after a drift run (268k tracked objects;
    bench/RESULTS.md), the whole exit of a short command. With a non-daemon thread still running, the normal exit,
    which joins it."""
    import atexit
    import os
    import threading

    if not isinstance(code, int) or any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                        if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`driftscope ... | head`) or stream: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    command()
