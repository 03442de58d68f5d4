"""Command-line entry point `driftscope`: argparse wiring only."""
from __future__ import annotations

import argparse
import json
import sys


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


def _cmd_drift(args: argparse.Namespace) -> int:
    import logging

    from driftscope.analysis.run import drift

    logging.basicConfig(level=logging.WARNING, format="driftscope: %(message)s")
    kwargs = args.chat_template_kwargs or {}
    try:
        report = drift(
            args.base, args.tuned, args.data, args.out,
            max_batch_tokens=args.max_batch_tokens, max_seq_len=args.max_seq_len, device=args.device,
            dtype=args.dtype, pca=args.pca, pca_queries=args.pca_queries, pca_texts=args.pca_texts,
            cka=args.cka, resume=args.resume, progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every, chat_template_kwargs=kwargs,
            generate=args.generate, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
            chat=args.chat, system=args.system, thinking=args.thinking, prompt_field=args.field,
            cache_memory=args.cache_memory, max_num_seqs=args.max_num_seqs, generate_chunk=args.generate_chunk,
        )
    except KeyboardInterrupt:
        print(f"interrupted; continue with the same command plus --resume (state in {args.out})", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"driftscope drift: error: {exc}", file=sys.stderr)
        return 2
    for model, m in report.summary["models"].items():
        for task, t in m["tasks"].items():
            print(f"{model} / {task}: {t['tokens']} tokens, {t['samples']} samples, "
                  f"KL(tuned||base) {t['kl_tb']['token_mean']:.5f}, sampled KL {t['sampled_kl']:.5f}, "
                  f"rank shift {t['rank_shift']['token_mean']:.3f}, top-1 agreement {t['top1_agreement']:.1%}")
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0


def _size(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for u, mult in units.items():
        if t.endswith(u):
            t, scale = t[: -len(u)], mult
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GiB, 512MiB, 1e9)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return int(value)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object, e.g. '{{\"enable_thinking\": false}}'")
    return value


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected on or off")
    return text == "on"


def _add_sampling(p: argparse.ArgumentParser, max_new_default: int) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_default, help="tokens to generate at most (%(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (%(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (%(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (%(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the per-sequence random streams (%(default)s)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); trimmed from the output")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (fixed-length benchmarks)")
    g.add_argument("--chat", action="store_true", help="render 'prompt' fields as a user message with the chat template")
    g.add_argument("--system", default=None, help="system prompt for --chat")
    g.add_argument("--thinking", type=_on_off, default=None, help="on/off: the template's enable_thinking (Qwen3)")
    g.add_argument("--cache-memory", type=_size, default=None, help="KV cache budget, e.g. 2GiB (default: 90%% of "
                   "free GPU memory, a quarter of RAM on the CPU)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together at most (%(default)s)")


def _cmd_generate(args: argparse.Namespace) -> int:
    import logging

    from driftscope.analysis.responses import GenerateOptions, generate_responses
    from driftscope.engine.sampling import SamplingParams

    logging.basicConfig(level=logging.WARNING, format="driftscope: %(message)s")
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, n=args.n, stop=tuple(args.stop),
                                ignore_eos=args.ignore_eos)
        opts = GenerateOptions(limit=args.limit, prompt_field=args.field, chat=args.chat, system=args.system,
                               thinking=args.thinking, chat_template_kwargs=args.chat_template_kwargs or {},
                               device=args.device, dtype=args.dtype, cache_memory=args.cache_memory,
                               max_num_seqs=args.max_num_seqs, progress=False if args.no_progress else None,
                               restart=args.restart, overwrite=args.overwrite)
        report = generate_responses(args.model, args.data, args.out, params, opts)
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue ({args.out}.partial keeps what was done)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        print(f"driftscope generate: error: {exc}", file=sys.stderr)
        return 2
    st = report.stats
    print(f"{report.records} responses -> {report.out} ({report.resumed} from the interrupted run; "
          f"{st['decode_tokens'] + st['prefill_tokens']} tokens computed in {st['steps']} steps, "
          f"{st['preemptions']} preemptions)")
    if report.problems:
        print(f"{len(report.problems)} records skipped; first: {report.problems[0]}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftscope", description="lockstep base-vs-tuned LLM drift probing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("backends", help="print which kernel backends are available and why")
    p.set_defaults(func=_cmd_backends)
    p = sub.add_parser("demo", help="offline demo on a tiny base/tuned pair built on the spot")
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("drift", help="compare a base model with tuned models on records files, in lockstep")
    p.add_argument("--base", required=True, help="base checkpoint folder (config.json + safetensors + tokenizer)")
    p.add_argument("--tuned", required=True, action="append", help="tuned checkpoint folder (repeatable)")
    p.add_argument("--data", required=True, action="append", help="records file: JSONL/JSON/parquet (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="token budget per packed batch (%(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None, help="keep the first N tokens of each sample")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--pca", default="streaming", choices=["streaming", "paper", "none"])
    p.add_argument("--pca-queries", type=int, default=30, help="paper mode: number of query texts (%(default)s)")
    p.add_argument("--pca-texts", default=None, help="paper mode: plain-text file of queries, one per line")
    p.add_argument("--cka", default="auto", choices=["auto", "full", "projected", "none"])
    p.add_argument("--chat-template-kwargs", type=_json_object, default=None,
                   help='JSON object, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--generate", action="store_true", help="each tuned model generates from the records' prompts and "
                   "the base follows in lockstep: drift measured in the generation pass (no response files needed)")
    p.add_argument("--field", default=None, help="--generate: record field holding the prompt")
    p.add_argument("--generate-chunk", type=int, default=256, help="--generate: prompts per resumable unit (%(default)s)")
    _add_sampling(p, 512)
    p.set_defaults(func=_cmd_drift)

    p = sub.add_parser("generate", help="generate responses for a prompts file with continuous batching")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors + tokenizer)")
    p.add_argument("--data", required=True, help="prompts file: JSONL/JSON/parquet records")
    p.add_argument("--out", required=True, help="responses file (JSONL, the paper's {input, output} records)")
    p.add_argument("--limit", type=int, default=None, help="the first N usable records only")
    p.add_argument("--field", default=None, help="record field holding the prompt (default: messages, input, prompt, "
                   "question, problem or text, the first present)")
    p.add_argument("-n", type=int, default=1, help="samples per prompt (%(default)s)")
    _add_sampling(p, 512)
    p.add_argument("--chat-template-kwargs", type=_json_object, default=None, help="JSON object passed to the template")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--restart", action="store_true", help="discard an interrupted run with other options in OUT.partial")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_generate)

    from driftscope.eval import eval_cli, ti_cli

    eval_cli.add_parser(sub)
    ti_cli.add_parser(sub)
    sub.add_parser("lm-eval", help="lm-eval's own CLI with the 'driftscope' model registered and driftscope's tasks "
                   "(ds_*) on the include path; every argument goes to lm-eval", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "lm-eval":  # a passthrough: lm-eval parses its own arguments
        from driftscope.eval.eval_cli import run_lm_eval

        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
