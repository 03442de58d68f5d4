"""The two ways to get token-level drift metrics for a base/tuned pair over a records file, for bench/.

`lockstep`: driftscope.drift (both models in lockstep, fused vocab probe, no [N, V] tensor).
`paper`: the paper's way, with transformers: each model run separately over every sample, its full logits for the
response positions kept (float32 [N, V]), then KL / log-probs / ranks computed from the two kept tensors.
Run as a script (`python bench/drift_workloads.py WAY BASE TUNED DATA`) it prints seconds, tokens and peak
resident memory (VmHWM) above the process's RSS after imports, in a fresh process.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def lockstep(base: Path, tuned: Path, data: Path) -> int:
    from driftscope import drift

    s = drift(base, tuned, data, progress=False, max_batch_tokens=4096, pca="streaming")
    return sum(t["tokens"] for t in s.summary["models"][Path(tuned).name]["tasks"].values())


@torch.inference_mode()
def paper(base: Path, tuned: Path, data: Path) -> int:
    import transformers

    from driftscope import load_tokenizer
    from driftscope.records import load_samples

    samples, _ = load_samples(data, load_tokenizer(base))
    kept = []
    for ckpt in (base, tuned):  # one model at a time, as two separate vLLM runs would
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
        rows = []
        for s in samples:
            logits = model(s.input_ids[None]).logits[0]  # [L, V] float32, every position
            rows.append(logits[s.first_scored : len(s.input_ids) - 1].clone())  # keep the response positions
            del logits
        kept.append(torch.cat(rows))  # [N, V]
        del model
    zb, zt = kept
    y = torch.cat([s.input_ids[s.first_scored + 1 :] for s in samples])
    lq, lp = torch.log_softmax(zb, -1), torch.log_softmax(zt, -1)
    kl_tb = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    kl_bt = torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    rank_b = 1 + (zb > zb.gather(1, y[:, None])).sum(-1)
    rank_t = 1 + (zt > zt.gather(1, y[:, None])).sum(-1)
    _ = (kl_tb.mean(), kl_bt.mean(), (rank_b - rank_t).double().mean(),
         lq.gather(1, y[:, None]), lp.gather(1, y[:, None]))
    return int(y.numel())


WAYS = {"lockstep": lockstep, "paper": paper}
SHARED = Path(__file__).resolve().parents[2] / "shared"


def write_pair(root: Path, n_records: int) -> tuple[Path, Path, Path]:
    """The bench pair: tiny random Qwen3 weights (hidden 256, 4 layers, seeds 0 and 1) at the real vocabulary size
    V = 151,936 with the real Qwen tokenizer, and the first `n_records` real MATH500 responses. (base, tuned, data)."""
    import shutil
    import subprocess

    from driftscope.testing import random_checkpoint

    src = SHARED / "data" / "responses" / "UniReason-RL_hendrycks_math_500.jsonl"
    subprocess.run([sys.executable, str(SHARED / "tools" / "qwen_tokenizer_json.py"), str(root / "base")], check=True,
                   capture_output=True)
    for name, seed in (("base", 0), ("tuned", 1)):
        random_checkpoint(root / name, arch="qwen3", vocab_size=151936, hidden_size=256, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=64, intermediate_size=768, tie=False, seed=seed)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "base" / f, root / "tuned" / f)
    data = root / "math500.jsonl"
    data.write_text("\n".join(src.read_text().splitlines()[:n_records]) + "\n")
    return root / "base", root / "tuned", data


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main() -> None:
    way, base, tuned, data = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    import transformers  # noqa: F401  (imports are not the workload's memory)

    import driftscope.drift_run.run  # noqa: F401

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kb("VmRSS")
    t0 = time.perf_counter()
    tokens = WAYS[way](base, tuned, data)
    seconds = time.perf_counter() - t0
    print(json.dumps({"way": way, "seconds": seconds, "tokens": tokens, "peak_mb": (_kb("VmHWM") - before) / 1024}))


if __name__ == "__main__":
    main()
