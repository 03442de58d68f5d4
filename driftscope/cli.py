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
    kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}
    try:
        report = drift(
            args.base, args.tuned, args.data, args.out,
            max_batch_tokens=args.max_batch_tokens, max_seq_len=args.max_seq_len, device=args.device,
            dtype=args.dtype, pca=args.pca, pca_queries=args.pca_queries, pca_texts=args.pca_texts,
            cka=args.cka, resume=args.resume, progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every, chat_template_kwargs=kwargs,
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
    p.add_argument("--chat-template-kwargs", default=None, help='JSON, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--checkpoint-every", type=float, default=30.0, help="seconds between resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_drift)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
