"""Peak extra resident memory of one workload, measured in a fresh process.

Usage: python bench/peak_rss.py WORKLOAD CKPT_DIR SEQ_LEN N_SEQS  -> prints {"peak_extra_mb": ...}
(the generate workloads, `generate`, `transformers-generate-batched`, `transformers-generate-sequential`, take their
prompts from bench/generate_workload.py and ignore SEQ_LEN and N_SEQS)
The process loads the model, runs the workload once (warm-up), resets the kernel's high-water mark
(/proc/self/clear_refs = 5), runs it again and reports VmHWM - VmRSS(before): the memory the
forward itself needs on top of the weights, comparable across implementations.
"""
from __future__ import annotations

import json
import sys


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(run) -> float:
    run()  # warm-up: allocator caches, lazy inits
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - before) / 1024


def main() -> None:
    workload, ckpt, seq_len, n_seqs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import torch

    torch.manual_seed(0)
    if workload == "engine":
        from driftscope import load_model

        model = load_model(ckpt)
        ids = torch.randint(0, model.config.vocab_size, (n_seqs * seq_len,))
        cu = torch.arange(0, n_seqs * seq_len + 1, seq_len, dtype=torch.int32)
        run = lambda: model(ids, cu)  # noqa: E731
    elif workload == "transformers":
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()
        ids = torch.randint(0, hf.config.vocab_size, (n_seqs, seq_len))

        def run():
            with torch.inference_mode():
                return hf.model(input_ids=ids).last_hidden_state

    elif workload.startswith(("generate", "transformers-generate")):
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))  # bench/ is no package
        import generate_workload as w

        if workload == "generate":
            from driftscope import load_model

            run = w.driftscope_run(load_model(ckpt))
        else:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
            run = w.transformers_batched_run(hf) if workload.endswith("batched") else w.transformers_sequential_run(hf)
    else:
        raise SystemExit(f"unknown workload {workload!r}; expected engine, transformers, generate, "
                         "transformers-generate-batched or transformers-generate-sequential")
    print(json.dumps({"peak_extra_mb": measure(run)}))


if __name__ == "__main__":
    main()
